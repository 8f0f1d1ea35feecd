"""JSON files that are cut off or malformed: the error names the file and where its text stops
being JSON (msgspec alone reports ``[1,2`` read as a workload as "Expected `object`, got `array`")."""

from __future__ import annotations

import json

import pytest

from muxserve.engine.model_config import ModelSpec
from muxserve.errors import InputError, WorkloadError
from muxserve.placement.costs import load_cost_table
from muxserve.workload.workload_file import WorkloadRequest, load_workload, write_workload


@pytest.mark.parametrize("text, message", [
    ("[1,2", "not valid JSON (truncated?): the text ends at byte 4 before the document is complete"),
    ('{"arrivals": [0.5], "requests": [{"model_name": "llm-0", "idx": 0, "data": [[1, 2], 2',
     "not valid JSON (truncated?): the text ends at byte 85 before the document is complete"),
    ("[1,2\n\n", "not valid JSON (truncated?): the text ends at byte 6 before the document is complete"),
    ("", "not valid JSON: the file is empty"),
])
def test_workload_file_errors_name_the_file_and_the_byte(tmp_path, text, message):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(WorkloadError) as e:
        load_workload(path)
    assert str(e.value) == f"workload file {path}: {message}"


@pytest.mark.parametrize("text, fragment", [
    ("[1, nope]", "not valid JSON near byte 8: "),  # the byte after "nope", then msgspec's reason
    ("[1,2]", "object"),  # valid JSON of the wrong shape: not reported as broken JSON, the shape named
    ('{"arrivals": [0.5], "requests": [{"model_name": "llm-0", "idx": "a", "data": [[1], 1, 2]}]}',
     "requests[0].idx"),  # the field of the wrong type
])
def test_workload_file_errors_of_msgspec_name_the_file_and_the_place(tmp_path, text, fragment):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(WorkloadError) as e:
        load_workload(path)
    message = str(e.value)
    assert message.startswith(f"workload file {path}: ") and fragment in message, message
    assert fragment.startswith("not valid JSON") or "not valid JSON" not in message


def test_a_cut_off_copy_of_a_real_workload_is_reported_as_truncated(tmp_path):
    full = tmp_path / "full.json"
    write_workload(full, {"rates": [["llm-0", 1.0]]}, [WorkloadRequest(0, "llm-0", 0.0, [5, 6, 7], 4)])
    assert load_workload(full).requests[0].prompt_token_ids == [5, 6, 7]
    cut = tmp_path / "cut.json"
    cut.write_bytes(full.read_bytes()[:-9])
    with pytest.raises(WorkloadError, match=r"cut.json: not valid JSON \(truncated\?\): the text ends at byte "
                                            rf"{cut.stat().st_size} before"):
        load_workload(cut)


def test_cost_table_and_model_config_errors(tmp_path):
    table = tmp_path / "costs.json"
    table.write_text('{"llama": {"1": {')
    with pytest.raises(InputError) as e:
        load_cost_table(table)
    assert str(e.value) == (f"cost table {table}: not valid JSON (truncated?): the text ends at byte 17 before "
                            "the document is complete")
    table.write_text('{"llama": oops}')
    with pytest.raises(InputError) as e:
        load_cost_table(table)
    assert str(e.value) == f"cost table {table}: not valid JSON at byte 10 (line 1 column 11): Expecting value"

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})[:20])
    with pytest.raises(InputError) as e:
        ModelSpec.from_folder(folder)
    assert str(e.value) == (f"{folder / 'config.json'}: not valid JSON (truncated?): the text ends at byte 20 "
                            "before the document is complete")
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working
