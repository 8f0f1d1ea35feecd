"""Workload generator: reproducibility, rates, lengths, filters, numeric order, power law, LMSYS, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from muxserve.workload.arrivals import ArrivalProcess
from muxserve.workload.cli import main
from muxserve.workload.datasets import LengthFilter, load_sharegpt, load_tokenizer, read_json_records
from muxserve.workload.generator import power_law_rates, request_counts
from muxserve.workload.lmsys import translate_lmsys
from muxserve.workload.models_file import natural_key
from muxserve.workload.workload_file import load_workload

REPO = Path(__file__).resolve().parents[2]
WORDS = ("alpha beta gamma delta kernel page batch decode prefill model cache token quota mesh share "
         "server engine").split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def sharegpt_records() -> list[dict]:
    """40 dialogs: 34 that pass the default filter, a one-turn one, a 2-word prompt, a 3-word reply,
    a 1100-word prompt, a 1500 + 900-word dialog (too long in total) and one with no turns."""
    recs = []
    for i in range(34):
        recs.append({"id": f"ok{i}", "conversations": [
            {"from": "human", "value": _text(i, 6 + 5 * i)}, {"from": "gpt", "value": _text(i + 1, 5 + 3 * i)},
            {"from": "human", "value": "thanks"}]})
    recs.append({"id": "one-turn", "conversations": [{"from": "human", "value": _text(1, 30)}]})
    recs.append({"id": "short-prompt", "conversations": [{"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": _text(2, 20)}]})
    recs.append({"id": "short-reply", "conversations": [{"from": "human", "value": _text(3, 20)},
                                                       {"from": "gpt", "value": "ok"}]})
    recs.append({"id": "long-prompt", "conversations": [{"from": "human", "value": _text(4, 1100)},
                                                       {"from": "gpt", "value": _text(5, 20)}]})
    recs.append({"id": "long-total", "conversations": [{"from": "human", "value": _text(6, 900)},
                                                      {"from": "gpt", "value": _text(7, 1500)}]})
    recs.append({"id": "empty", "conversations": []})
    return recs


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sharegpt_tiny.json"
    path.write_text(json.dumps(sharegpt_records(), indent=1))
    return path


def write_models(path: Path, rates: dict[str, float], model: str = "smollm2-135m") -> Path:
    doc = {"cluster": {"nnodes": 1, "ngpus_per_node": 1},
           "models": [{"name": n, "model": model, "rate": r} for n, r in rates.items()]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def generate(tmp_path, dataset, rates, *extra, name="w.json") -> tuple[int, Path]:
    models = write_models(tmp_path / f"models_{name}.yaml", rates)
    out = tmp_path / name
    rc = main(["--dataset-source", str(dataset), "--model-yaml", str(models), "--output-file", str(out), *extra])
    return rc, out


def test_equal_seeds_give_identical_bytes_and_other_seeds_differ(tmp_path, dataset, smollm2_folder):
    rates = {"llm-0": 3, "llm-1": 1.5}
    assert generate(tmp_path, dataset, rates, "--seed", "7", "--num-requests", "12", name="a.json")[0] == 0
    assert generate(tmp_path, dataset, rates, "--seed", "7", "--num-requests", "12", name="b.json")[0] == 0
    assert generate(tmp_path, dataset, rates, "--seed", "8", "--num-requests", "12", name="c.json")[0] == 0
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.json", "b.json", "c.json"))
    assert a == b
    assert a != c
    da, dc = json.loads(a), json.loads(c)
    assert da["arrivals"] != dc["arrivals"]
    assert [r["data"][0] for r in da["requests"]] != [r["data"][0] for r in dc["requests"]]
    assert da["info"]["seed"] == 7


def test_counts_follow_rates_and_the_file_is_well_formed(tmp_path, dataset, smollm2_folder):
    rc, out = generate(tmp_path, dataset, {"llm-0": 3, "llm-1": 2, "llm-2": 1}, "--num-requests", "30")
    assert rc == 0
    doc = json.loads(out.read_text())
    info = doc["info"]
    assert info["rates"] == [["llm-0", 3.0], ["llm-1", 2.0], ["llm-2", 1.0]]
    assert info["num_requests"] == [30, 20, 10]
    assert info["duration"] == 10.0 and info["distribution"] == "poisson" and info["start"] == 0.0
    assert doc["arrivals"] == sorted(doc["arrivals"]) and len(doc["arrivals"]) == 60
    assert [r["idx"] for r in doc["requests"]] == list(range(60))
    counts = {n: sum(r["model_name"] == n for r in doc["requests"]) for n in ("llm-0", "llm-1", "llm-2")}
    assert counts == {"llm-0": 30, "llm-1": 20, "llm-2": 10}
    workload = load_workload(out)
    assert len(workload.requests) == 60 and workload.rates() == {"llm-0": 3.0, "llm-1": 2.0, "llm-2": 1.0}


def test_measured_rates_match_the_yaml_by_duration(tmp_path, dataset, smollm2_folder):
    rates = {"llm-0": 4.0, "llm-1": 1.0}
    rc, out = generate(tmp_path, dataset, rates, "--duration", "100", "--seed", "3", "--max-output-len", "8")
    assert rc == 0
    workload = load_workload(out)
    for name, rate in rates.items():
        times = [r.arrival for r in workload.requests if r.llm == name]
        expected = rate * 100
        assert abs(len(times) - expected) < 4 * math.sqrt(expected), (name, len(times))
        assert times[0] > 0 and times[-1] < 100
    assert workload.info["num_requests"] == [sum(r.llm == n for r in workload.requests) for n in rates]


def test_arrival_processes():
    rng = np.random.default_rng(0)
    uniform = ArrivalProcess("uniform", 4.0).by_count(rng, 5, start=1.0)
    assert uniform.tolist() == [1.25, 1.5, 1.75, 2.0, 2.25]
    gaps = np.diff(ArrivalProcess("gamma", 2.0, cv=3.0).by_count(np.random.default_rng(1), 20000))
    assert abs(gaps.mean() - 0.5) < 0.03 and abs(gaps.std() / gaps.mean() - 3.0) < 0.15
    gaps = np.diff(ArrivalProcess("poisson", 5.0).by_count(np.random.default_rng(2), 20000))
    assert abs(gaps.mean() - 0.2) < 0.006 and abs(gaps.std() / gaps.mean() - 1.0) < 0.03
    times = ArrivalProcess("poisson", 10.0).by_duration(np.random.default_rng(3), 50.0, start=5.0)
    assert times.min() > 5.0 and times.max() < 55.0 and abs(len(times) - 500) < 4 * math.sqrt(500)
    assert request_counts({"a": 12, "b": 5, "c": 0.01}, 200) == {"a": 200, "b": 83, "c": 1}


def test_lengths_are_the_tokenizers_and_the_filter_holds(tmp_path, dataset, tokenizer):
    rc, out = generate(tmp_path, dataset, {"llm-0": 2, "llm-1": 2}, "--num-requests", "40")
    assert rc == 0
    expected = {}
    for rec in sharegpt_records():
        turns = rec["conversations"]
        if len(turns) >= 2:
            prompt = tokenizer(turns[0]["value"])["input_ids"]
            reply = tokenizer(turns[1]["value"], add_special_tokens=False)["input_ids"]
            expected[tuple(prompt)] = (rec["id"], len(reply))
    doc = json.loads(out.read_text())
    used = set()
    for r in doc["requests"]:
        ids, prompt_len, output_len = r["data"]
        rec_id, reply_len = expected[tuple(ids)]
        used.add(rec_id)
        assert prompt_len == len(ids) and output_len == reply_len
        assert 4 <= prompt_len <= 1024 and output_len >= 4 and prompt_len + output_len <= 2048
    assert used and all(u.startswith("ok") for u in used)  # the six bad dialogs never appear
    # 40 requests per LLM from 34 usable dialogs: every usable dialog is drawn before any repeats
    per_llm = [tuple(r["data"][0]) for r in doc["requests"] if r["model_name"] == "llm-0"]
    assert len(set(per_llm)) == 34
    prompts = [len(r["data"][0]) for r in doc["requests"]]
    outputs = [r["data"][2] for r in doc["requests"]]
    info = doc["info"]
    assert info["prompt_len"] == round(float(np.mean(prompts)), 3) == info["prompt_len_stats"]["mean"]
    assert info["output_len"] == round(float(np.mean(outputs)), 3)
    assert info["prompt_len_stats"]["p90"] == round(float(np.percentile(prompts, 90)), 3)
    assert info["output_len_stats"]["max"] == max(outputs) and info["prompt_len_stats"]["min"] == min(prompts)
    assert info["tokenizers"] == {"llm-0": "smollm2-135m", "llm-1": "smollm2-135m"}


def test_custom_filter_and_output_cap(tmp_path, dataset, tokenizer):
    rc, out = generate(tmp_path, dataset, {"llm-0": 1}, "--num-requests", "15", "--max-prompt-len", "30",
                       "--min-output-len", "10", "--max-output-len", "12")
    assert rc == 0
    doc = json.loads(out.read_text())
    assert all(len(r["data"][0]) <= 30 and r["data"][2] <= 12 for r in doc["requests"])
    assert doc["info"]["max_output_len"] == 12 and doc["info"]["filter"]["max_prompt_len"] == 30
    assert doc["info"]["output_len_stats"]["max"] == 12
    # the cap applies after the filter: no reply under 10 tokens got in
    assert min(r["data"][2] for r in doc["requests"]) >= 10


def test_llm_ids_sort_numerically(tmp_path, dataset, smollm2_folder):
    names = [f"llm-{i}" for i in range(12)]
    rates = {n: float(12 - i) for i, n in enumerate(names)}
    shuffled = dict(sorted(rates.items(), key=lambda kv: kv[0]))  # llm-0, llm-1, llm-10, llm-11, llm-2, ...
    rc, out = generate(tmp_path, dataset, shuffled, "--num-requests", "12", "--max-output-len", "4")
    assert rc == 0
    info = json.loads(out.read_text())["info"]
    assert [n for n, _ in info["rates"]] == names
    assert [r for _, r in info["rates"]] == [float(12 - i) for i in range(12)]
    assert info["num_requests"] == [12 - i for i in range(12)]
    assert sorted(["llm-10", "llm-2", "llm-1"], key=natural_key) == ["llm-1", "llm-2", "llm-10"]


def test_power_law(tmp_path, dataset, smollm2_folder):
    assert power_law_rates(4, 1.0, 20.0) == [20.0, 10.0, 6.666667, 5.0]
    assert power_law_rates(3, 0.0, 7.0) == [7.0, 7.0, 7.0]
    models_out, out = tmp_path / "pl.yaml", tmp_path / "pl.json"
    rc = main(["power-law", "--alpha", "2", "--max-rate", "8", "--rate-scale", "0.5", "--llms", "smollm2-135m=2",
               f"random:{smollm2_folder}=1", "--models-yaml-out", str(models_out), "--output-file", str(out),
               "--dataset-source", str(dataset), "--duration", "20", "--ngpus-per-node", "2"])
    assert rc == 0
    doc = yaml.safe_load(models_out.read_text())
    assert doc["cluster"] == {"nnodes": 1, "ngpus_per_node": 2}
    assert [(m["name"], m["model"], m["rate"]) for m in doc["models"]] == [
        ("llm-0", "smollm2-135m", 4.0), ("llm-1", "smollm2-135m", 1.0), ("llm-2", f"random:{smollm2_folder}", 0.444444)]
    info = json.loads(out.read_text())["info"]
    assert info["rates"] == [["llm-0", 4.0], ["llm-1", 1.0], ["llm-2", 0.444444]] and info["alpha"] == 2.0
    # random:FOLDER keeps the folder's tokenizer
    assert info["tokenizers"]["llm-2"] == f"random:{smollm2_folder}"


def test_a_model_without_tokenizer_falls_back_to_the_embedded_one(tmp_path, dataset, smollm2_folder, caplog):
    shape = tmp_path / "llama-shape"
    shape.mkdir()
    (shape / "config.json").write_text((Path(smollm2_folder) / "config.json").read_text())
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n- {{name: llm-0, model: 'random:{shape}', rate: 1}}\n"
                      f"- {{name: llm-1, model: smollm2-135m, rate: 1}}\n")
    out = tmp_path / "w.json"
    assert main(["--dataset-source", str(dataset), "--model-yaml", str(models), "--output-file", str(out),
                 "--num-requests", "4"]) == 0
    assert json.loads(out.read_text())["info"]["tokenizers"] == {"llm-0": "smollm2-135m", "llm-1": "smollm2-135m"}
    assert f"llm-0: no tokenizer for 'random:{shape}'" in caplog.text
    # --tokenizer overrides every LLM's own
    assert main(["--dataset-source", str(dataset), "--model-yaml", str(models), "--output-file", str(out),
                 "--num-requests", "4", "--overwrite", "--tokenizer", str(smollm2_folder)]) == 0
    assert set(json.loads(out.read_text())["info"]["tokenizers"].values()) == {str(smollm2_folder)}


def lmsys_trace() -> list[dict]:
    day = 86400.0
    t0 = 1_700_000_000.0

    def rec(t, model, prompt_words=8, reply_words=9, turns=2):
        conv = [{"role": "user", "content": _text(int(t) % 13, prompt_words)},
                {"role": "assistant", "content": _text(int(t) % 11, reply_words)}][:turns]
        return {"conversation": conv, "model": model, "tstamp": t}

    return [
        rec(t0 + 0.5 * day, "vicuna-13b"),  # before the window
        rec(t0 + 1.0 * day + 100, "koala-13b"),
        rec(t0 + 1.0 * day + 40, "vicuna-13b"),  # out of order in the file: sorted by tstamp
        rec(t0 + 1.0 * day + 160, "vicuna-13b", turns=1),  # one turn: filtered
        rec(t0 + 1.0 * day + 220, "alpaca-13b"),
        rec(t0 + 1.0 * day + 340, "vicuna-13b"),
        rec(t0 + 1.0 * day + 400, "koala-13b", prompt_words=2),  # prompt too short: filtered
        rec(t0 + 1.0 * day + 460, "koala-13b"),
        rec(t0 + 2.0 * day + 10, "alpaca-13b"),  # after the window
        rec(t0, "dolly-12b"),  # the first tstamp: day 0 counts from here
    ]


def test_lmsys_translation(tmp_path, tokenizer):
    info, requests = translate_lmsys(lmsys_trace(), tokenizer, source="trace.json", start_day=1.0, end_day=2.0,
                                     condense=20.0)
    assert [(r.llm, r.arrival) for r in requests] == [
        ("llm-0", 0.0), ("llm-1", 3.0), ("llm-2", 9.0), ("llm-0", 15.0), ("llm-1", 21.0)]
    assert info["chatlmsys_map"] == {"vicuna-13b": "llm-0", "koala-13b": "llm-1", "alpaca-13b": "llm-2"}
    assert info["rates"] == [["llm-0", round(2 / 15.0, 6)], ["llm-1", round(2 / 18.0, 6)], ["llm-2", 1.0]]
    assert info["num_requests"] == [2, 2, 1] and info["distribution"] == "chatlmsys" and info["duration"] == 21.0
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in lmsys_trace()) + "\n")
    out, models_out = tmp_path / "lmsys.json", tmp_path / "lmsys_models.yaml"
    rc = main(["lmsys", "--trace", str(trace), "--start-day", "1", "--end-day", "2", "--condense", "20",
               "--output-file", str(out), "--models-yaml-out", str(models_out), "--max-output-len", "5"])
    assert rc == 0
    workload = load_workload(out)
    assert [r.llm for r in workload.requests] == ["llm-0", "llm-1", "llm-2", "llm-0", "llm-1"]
    assert all(r.output_len == 5 for r in workload.requests)
    doc = yaml.safe_load(models_out.read_text())
    assert [m["rate"] for m in doc["models"]] == [r for _, r in info["rates"]]
    assert doc["avg_output_len"] == 5.0


def test_truncated_json_array_keeps_complete_records(tmp_path, caplog):
    path = tmp_path / "cut.json"
    text = json.dumps(sharegpt_records()[:3], indent=1)
    path.write_text(text[: text.rindex('"from"')])  # cut inside the third record
    assert len(read_json_records(path, "dataset")) == 2
    assert "cut off" in caplog.text
    assert len(load_sharegpt(path)) == 2


ERROR_CASES = {
    "missing dataset": (lambda tmp, models: ["--dataset-source", str(tmp / "nope.json"), "--model-yaml", models],
                        "error: dataset {tmp}/nope.json does not exist"),
    "missing model yaml": (lambda tmp, models: ["--model-yaml", str(tmp / "none.yaml")],
                           "error: model yaml {tmp}/none.yaml does not exist"),
    "yaml without rate": (lambda tmp, models: ["--model-yaml", str(_no_rate(tmp))],
                          "error: {tmp}/norate.yaml: models[1] ('llm-1') has no 'rate' (requests/s)"),
    "dataset in another format": (
        lambda tmp, models: ["--dataset-source", str(_other_format(tmp)), "--model-yaml", models],
        "error: dataset {tmp}/alpaca.json is not in ShareGPT format: record 0 has no 'conversations' list "
        "(it has ['instruction', 'output'])"),
    "dataset not json": (lambda tmp, models: ["--dataset-source", str(_not_json(tmp)), "--model-yaml", models],
                         "error: dataset {tmp}/bad.json: not valid JSON at line 1 column 3: Expecting value"),
}


def _no_rate(tmp: Path) -> Path:
    path = tmp / "norate.yaml"
    path.write_text("models:\n- {name: llm-0, model: smollm2-135m, rate: 1}\n- {name: llm-1, model: smollm2-135m}\n")
    return path


def _other_format(tmp: Path) -> Path:
    path = tmp / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "say hi", "output": "hi"}]))
    return path


def _not_json(tmp: Path) -> Path:
    path = tmp / "bad.json"
    path.write_text("[ nope ]")
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_a_clear_error(case, tmp_path, dataset, capsys):
    models = str(write_models(tmp_path / "models.yaml", {"llm-0": 1}))
    make_args, message = ERROR_CASES[case]
    args = make_args(tmp_path, models)
    if "--dataset-source" not in args:
        args += ["--dataset-source", str(dataset)]
    rc = main(args + ["--output-file", str(tmp_path / "out.json")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == message.format(tmp=tmp_path)
    assert not (tmp_path / "out.json").exists()


def test_existing_output_is_not_overwritten(tmp_path, dataset, smollm2_folder, capsys):
    out = tmp_path / "w.json"
    out.write_text("keep me")
    models = str(write_models(tmp_path / "models.yaml", {"llm-0": 1}))
    args = ["--dataset-source", str(dataset), "--model-yaml", models, "--output-file", str(out), "--num-requests", "3"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: output file {out} already exists; pass --overwrite to replace it"
    assert out.read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 0
    assert len(load_workload(out).requests) == 3


def test_readme_command_on_the_real_dataset(tmp_path, smollm2_folder):
    """The original README's command, run as a script from the repository root, on ShareGPT V3."""
    from muxserve.workload.datasets import default_sharegpt_path

    try:
        source = default_sharegpt_path()
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path / "sharedgpt_n3_rate_3_2_1.json"
    cmd = [sys.executable, "muxserve/muxsched/workload_utils.py", "--dataset-source", str(source),
           "--workload_info_from_yaml", "True", "--output-file", str(out), "--model-yaml", "examples/basic/models.yaml"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    workload = load_workload(out)
    assert workload.info["num_requests"] == [200, 133, 67] and len(workload.requests) == 400
    assert workload.info["rates"] == [["llm-0", 3.0], ["llm-1", 2.0], ["llm-2", 1.0]]
    f = LengthFilter()
    assert all(f.keeps(len(r.prompt_token_ids), r.output_len) for r in workload.requests)
    # the second run refuses to overwrite, with exit code 2 and no traceback
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr


def test_a_model_whose_vocabulary_cannot_hold_the_token_ids_is_refused(tmp_path, dataset, smollm2_folder, capsys):
    shape = REPO / "examples" / "shapes" / "llama-2-7b"  # config only (vocabulary 32000): SmolLM2's tokenizer
    refusal = (f"error: LLM 'llm-1' (model '{shape}'): the 'smollm2-135m' tokenizer used for its prompts has a "
               "vocabulary of 49152 tokens, more than the model's 32000; choose a tokenizer that fits the model with "
               "--tokenizer")
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n- {{name: llm-0, model: smollm2-135m, rate: 2}}\n"
                      f"- {{name: llm-1, model: '{shape}', rate: 1}}\n")
    out = tmp_path / "w.json"
    args = ["--dataset-source", str(dataset), "--model-yaml", str(models), "--output-file", str(out),
            "--num-requests", "4"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == refusal
    assert main(args + ["--tokenizer", "smollm2-135m"]) == 2  # the same tokenizer, chosen explicitly
    assert capsys.readouterr().err.strip().splitlines()[-1] == refusal
    assert not out.exists()

    yaml_out = tmp_path / "power.yaml"
    assert main(["power-law", "--alpha", "1", "--llms", "smollm2-135m", str(shape), "--models-yaml-out",
                 str(yaml_out), "--dataset-source", str(dataset), "--num-requests", "4",
                 "--output-file", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == refusal
    assert not out.exists() and not yaml_out.exists()

    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in lmsys_trace()) + "\n")
    assert main(["lmsys", "--trace", str(trace), "--output-file", str(out), "--models-yaml-out", str(yaml_out),
                 "--model", str(shape)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: every LLM of --models-yaml-out (model '{shape}'): the 'smollm2-135m' tokenizer used for its prompts "
        "has a vocabulary of 49152 tokens, more than the model's 32000; choose a tokenizer that fits the model with "
        "--tokenizer")
    assert not out.exists() and not yaml_out.exists()


def test_progress_on_a_redirected_stderr_is_plain_lines(tmp_path, dataset, smollm2_folder, capsys):
    rc, _ = generate(tmp_path, dataset, {"llm-0": 2, "llm-1": 1}, "--num-requests", "4")
    assert rc == 0
    err = capsys.readouterr().err  # not a terminal: no bar redraws, one line at the end
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("sampling requests")]
    assert len(lines) == 1 and lines[0].startswith("sampling requests: 6/6 req (100 %), done in ")
