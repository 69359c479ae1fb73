"""The Azure Batch provider (``pip install "cloudmap[azure]"``): see docs/azure.md."""

from .provider import AzureBatchProvider

__all__ = ["AzureBatchProvider"]
