"""The node agent: what runs on a node (local process or Batch VM) to turn it into pool slots.

``python -m cloudmap.node CONFIG.json`` makes the node's directories, runs the pool's start
task, then keeps one Dask worker process per slot alive until told to stop. It imports
nothing heavy so that a node is up as fast as Python starts.
"""
