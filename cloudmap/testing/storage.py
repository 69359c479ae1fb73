"""Conformance: input and output files staged through storage around each task, and commands
run per item: on a local folder (file://) and on Azure Blob Storage (abfs://).

memory:// is left out: each node is its own process, and fsspec's memory filesystem lives
inside one process.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import cloudmap

from . import tasks
from .capabilities import requires
from .harness import ProviderHarness
from .stores import Store, blob_connection_string, blob_store, folder_store

#: Base64 of "wrong-key" repeated: an account key that is well formed and wrong.
WRONG_KEY = "d3Jvbmcta2V5" * 7 + "AA=="


class StorageTests:
    """Staged inputs and outputs, upload conditions and staging errors on the shared pool,
    for each kind of store."""

    @pytest.fixture(params=["file", "abfs"])
    def store(
        self, request: pytest.FixtureRequest, harness: ProviderHarness, tmp_path: Path
    ) -> Store:
        if request.param == "abfs":
            return blob_store(blob_connection_string(request))
        if not harness.can("local_nodes"):
            pytest.skip("a file:// store is seen by nodes only with the capability 'local_nodes'")
        return folder_store(tmp_path)

    @pytest.fixture
    def inputs(self, store: Store) -> Store:
        for name in ("a", "b", "c"):
            store.write(f"in/{name}.txt", f"hello {name}\n")
        store.write("in/common.txt", "shared\n")
        return store

    def test_map_downloads_inputs_and_uploads_outputs(
        self, pool: cloudmap.Pool, inputs: Store
    ) -> None:
        results = pool.map(
            tasks.shout,
            ["a", "b", "c"],
            inputs=[inputs.url("in/{item}.txt"), inputs.url("in/common.txt")],
            outputs=inputs.url("out/{item}.out"),
            storage_options=inputs.options,
        )
        assert results == [len("hello a\nshared\n")] * 3
        assert inputs.read("out/b.out") == "HELLO B\nSHARED\n"

    def test_run_a_command_per_item(self, pool: cloudmap.Pool, inputs: Store) -> None:
        results = pool.run(
            "tr a-z A-Z < {input} > {output} && echo done {item}",
            ["a", "b"],
            inputs=inputs.url("in/{item}.txt"),
            outputs=inputs.url("out/{item}.txt"),
            storage_options=inputs.options,
        )
        assert [r.exit_code for r in results] == [0, 0]
        assert [r.stdout for r in results] == ["done a\n", "done b\n"]
        assert results[0].outputs == [inputs.url("out/a.txt")]
        assert inputs.read("out/a.txt") == "HELLO A\n"
        node = pool.node(results[1].node)
        relative = Path(results[1].directory).relative_to(Path(results[1].directory).parents[2])
        assert node.read_file(str(relative / "stdout.txt")) == "done b\n"

    def test_a_failing_command_carries_its_stderr_and_loses_no_other_result(
        self, pool: cloudmap.Pool, inputs: Store
    ) -> None:
        results = pool.run(
            'if [ {item} = b ]; then echo "cannot read b" >&2; exit 3; fi; cat {input}',
            ["a", "b", "c"],
            inputs=inputs.url("in/{item}.txt"),
            storage_options=inputs.options,
            on_error="return",
        )
        assert results[0].stdout == "hello a\n" and results[2].stdout == "hello c\n"
        error = results[1]
        assert isinstance(error, cloudmap.TaskError)
        assert isinstance(error.exception, cloudmap.CommandError)
        assert error.exception.exit_code == 3 and "cannot read b" in str(error)

    def test_upload_conditions(self, pool: cloudmap.Pool, store: Store) -> None:
        results = pool.map(
            tasks.fail_with_log,
            ["x"],
            outputs=[
                cloudmap.Output(store.url("logs/{item}-failure.txt"), on="failure"),
                cloudmap.Output(store.url("logs/log.txt"), on="always"),
                store.url("logs/{item}.out"),
            ],
            storage_options=store.options,
            on_error="return",
        )
        assert isinstance(results[0], cloudmap.TaskError)
        assert store.read("logs/log.txt") == "x went wrong\n"
        assert not store.exists("logs/x.out"), "a success-only output was uploaded after a failure"

    @requires("local_nodes")  # the attempts mark themselves in the test's directory
    def test_a_retry_starts_in_a_clean_directory(self, pool: cloudmap.Pool, tmp_path: Path) -> None:
        fn = partial(tasks.dirty_then_clean, directory=str(tmp_path))
        # outputs= makes the call staged; the output is the file the attempt leaves behind.
        directories = pool.map(
            fn, ["r"], retries=1, outputs=f"file://{tmp_path}/out/leftover", progress=False
        )
        assert (tmp_path / "r.tried").exists() and (tmp_path / "out" / "leftover").exists()
        assert Path(directories[0]).name.startswith("item-0-")

    def test_a_missing_input_names_the_item_and_url_and_keeps_the_rest(
        self, pool: cloudmap.Pool, inputs: Store
    ) -> None:
        with pytest.raises(cloudmap.TaskError) as caught:
            pool.map(
                tasks.shout,
                ["a", "nothere", "c"],
                inputs=[inputs.url("in/{item}.txt"), inputs.url("in/common.txt")],
                storage_options=inputs.options,
                batch_size=1,
            )
        error = caught.value
        assert error.index == 1 and isinstance(error.exception, cloudmap.StagingError)
        assert f"input {inputs.url('in/nothere.txt')} of item 1 does not exist" in str(error)
        assert error.results.get(0) == len("hello a\nshared\n")

    def test_an_output_that_matched_no_file(self, pool: cloudmap.Pool, inputs: Store) -> None:
        with pytest.raises(cloudmap.TaskError, match=r"the task wrote no file 'a\.png'"):
            pool.map(
                tasks.shout,
                ["a"],
                inputs=[inputs.url("in/{item}.txt"), inputs.url("in/common.txt")],
                outputs=inputs.url("out/{item}.png"),
                storage_options=inputs.options,
            )

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            (
                {"inputs": "file:///in/{name}.txt"},
                r"names the field \{name\}, which does not exist",
            ),
            ({"outputs": "file:///out/{item"}, "malformed"),
            ({"storage_options": "key"}, "storage_options='key'"),
            ({"outputs": "memory://out/{item}"}, "memory:// lives inside one process"),
        ],
    )
    def test_bad_staging_arguments_fail_before_any_work(
        self, pool: cloudmap.Pool, arguments: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(cloudmap.InputError, match=message):
            pool.map(tasks.square, [1], **arguments)

    def test_bad_command_templates(self, pool: cloudmap.Pool) -> None:
        with pytest.raises(cloudmap.InputError, match=r"\{file\}, which does not exist"):
            pool.run("cat {file}", ["a"])
        with pytest.raises(cloudmap.InputError, match="no inputs= were given"):
            pool.run("cat {input}", ["a"])

    def test_wrong_credentials_name_the_url_and_stay_secret(
        self, harness: ProviderHarness, pool: cloudmap.Pool, request: pytest.FixtureRequest
    ) -> None:
        wrong = re.sub(
            r"AccountKey=[^;]*", f"AccountKey={WRONG_KEY}", blob_connection_string(request)
        )
        url = "abfs://nowhere/in/a.txt"
        results = pool.map(
            tasks.shout,
            ["a"],
            inputs=url,
            storage_options={"connection_string": wrong},
            on_error="return",
        )
        error = results[0]
        assert isinstance(error, cloudmap.TaskError)
        assert isinstance(error.exception, cloudmap.StagingError) and url in str(error)
        if harness.can("local_nodes"):
            assert harness.node_processes(WRONG_KEY[:12]) == [], "a command line shows the key"
        assert WRONG_KEY[:12] not in str(error)

    def test_an_executor_with_staging_refuses_submit(
        self, pool: cloudmap.Pool, tmp_path: Path
    ) -> None:
        executor = pool.executor(outputs=f"file://{tmp_path}/{{item}}.out")
        with pytest.raises(cloudmap.InputError, match="submit does not"):
            executor.submit(tasks.square, 2)
