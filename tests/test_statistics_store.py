"""The statistics store (exporter.compress.statistics_store): the Fisher importance and `--weights auto`'s prices
kept on disk and read back by the next run of the same model, calibration and exporter; anything else recomputed."""

from __future__ import annotations

import copy
import json
import shutil

import torch

import exporter.compress.format_allocation
import exporter.pipeline
from exporter.compress import statistics_store
from exporter.cli import main
from exporter.compress.statistics_store import StatisticsStore, model_digest, tensor_digest
from exporter.settings import TUNE_SCALES_STEPS


def test_a_file_is_read_back_only_under_its_own_key(tmp_path, capsys):
    store = StatisticsStore(tmp_path, {"model": "a"})
    tensors = {"x": torch.arange(5, dtype=torch.float64), "y": torch.ones(2, 3)}
    assert store.load("importance", [1, True]) is None
    path = store.save("importance", [1, True], tensors, {"units": [1]})
    loaded, info = store.load("importance", [1, True])
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert info == {"units": [1]}
    assert store.load("importance", [2, True]) is None  # another statistic key
    assert not list(tmp_path.glob("*.tmp"))

    other = StatisticsStore(tmp_path, {"model": "b"})  # another model: another file
    assert other.path("importance", [1, True]) != path and other.load("importance", [1, True]) is None
    shutil.copy(path, other.path("importance", [1, True]))  # a file where another key's belongs: not used
    assert other.load("importance", [1, True]) is None
    assert "computed for another model, calibration or exporter: recomputing" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert store.load("importance", [1, True]) is None
    assert "cannot be read" in capsys.readouterr().err


def test_the_key_follows_every_weight_and_window(tiny_models, calib_ids):
    model = tiny_models.load("llama")
    same = copy.deepcopy(model)
    assert model_digest(same) == model_digest(model)
    with torch.no_grad():
        weight = same.model.layers[-1].mlp.down_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1e9))  # one float, one step
    assert model_digest(same) != model_digest(model)
    changed = calib_ids.clone()
    changed[-1, -1] = (changed[-1, -1] + 1) % 100
    assert tensor_digest(changed) != tensor_digest(calib_ids)
    assert tensor_digest(calib_ids[:, :-1]) != tensor_digest(calib_ids.reshape(-1)[: calib_ids[:, :-1].numel()])


def _counted(monkeypatch, module, name) -> list:
    calls = []
    function = getattr(module, name)

    def call(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    monkeypatch.setattr(module, name, call)
    return calls


def _run(command, llama_dir, calib_file, *extra):
    """On the host, `--weights auto` by bytes alone: the decode ceiling's plans follow measured timings."""
    return main([command, "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "8",
                 "--calib-seq-len", "32", "--device", "host", "--no-progress", "--decode-ceiling", "off", *extra])


def test_auto_prices_are_priced_once_and_give_the_same_artifact(tmp_path, llama_dir, calib_file, monkeypatch,
                                                                 capsys):
    priced = _counted(monkeypatch, exporter.compress.format_allocation, "price_units")
    assert _run("allocate", llama_dir, calib_file, "--weights", "auto", "--budget-mb", "1000", "--json") == 0
    formats = json.loads(capsys.readouterr().out)["formats"]
    budget = f"{(formats['smallest_bytes'] + formats['chosen_bytes']) / 2 / 1e6:.4f}"  # the knapsack must mix
    assert len(priced) == 1

    assert _run("export", llama_dir, calib_file, "--weights", "auto", "--budget-mb", budget,
                "--out", str(tmp_path / "read")) == 0
    assert len(priced) == 1 and "format prices: read from" in capsys.readouterr().err
    assert _run("export", llama_dir, calib_file, "--weights", "auto", "--budget-mb", budget,
                "--out", str(tmp_path / "fresh"), "--fresh-statistics") == 0
    assert len(priced) == 2 and "read from" not in capsys.readouterr().err
    read, fresh = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("read", "fresh"))
    assert read["method"]["formats"] == fresh["method"]["formats"]
    assert read["method"]["scale_tuning"]["steps"] == TUNE_SCALES_STEPS > 0  # the CLI's default with auto
    assert len({u["format"] for u in read["method"]["formats"]["units"]}) > 1
    # the chosen grids recomputed from the stored sensitivities are GPTQ's grids of the full pricing, bit for bit
    assert (tmp_path / "read" / "model.onnx.data").read_bytes() == (tmp_path / "fresh" / "model.onnx.data").read_bytes()


def test_a_lower_budgets_prices_serve_a_higher_budget(tmp_path, llama_dir, calib_file, monkeypatch, capsys):
    """Prices stored by a budget below what 4 bits reach (its menu adds 2-bit grids, low-rank options and row
    splits) are read, narrowed, by a higher budget: nothing priced again, and the plan a pricing of the higher
    budget's own menu gives."""
    priced = _counted(monkeypatch, exporter.compress.format_allocation, "price_units")

    def allocate(store, budget):
        monkeypatch.setattr(statistics_store, "default_root", lambda: tmp_path / store)
        assert _run("allocate", llama_dir, calib_file, "--weights", "auto", "--budget-mb", budget, "--json") == 0
        out, err = capsys.readouterr()
        return json.loads(out)["formats"], err

    whole, _ = allocate("own", "1000")  # the 4/8-bit menu priced on its own
    mixing = f"{(whole['smallest_bytes'] + whole['chosen_bytes']) / 2 / 1e6:.4f}"
    own, _ = allocate("own", mixing)
    assert len(priced) == 1 and len({u["format"] for u in own["units"]}) > 1
    low, _ = allocate("wider", f"{whole['smallest_bytes'] * 0.9 / 1e6:.4f}")
    assert len(priced) == 2 and any(u["format"].startswith("int2") or "/" in u["format"] or u["rank"]
                                    for u in low["units"])
    narrowed, err = allocate("wider", mixing)
    assert len(priced) == 2 and "a lower budget's menu, narrowed" in err
    assert narrowed == own


def test_fisher_importance_is_computed_once_per_model_and_calibration(tmp_path, llama_dir, calib_file, monkeypatch,
                                                                      capsys, calib_text):
    fisher = _counted(monkeypatch, exporter.pipeline, "component_fisher")
    args = ("--ratio", "0.3", "--no-correctives", "--json")
    assert _run("allocate", llama_dir, calib_file, *args) == 0
    first = json.loads(capsys.readouterr().out)
    assert _run("allocate", llama_dir, calib_file, *args) == 0
    assert json.loads(capsys.readouterr().out)["projections"] == first["projections"] and len(fisher) == 1
    assert _run("allocate", llama_dir, calib_file, *args, "--fisher-samples", "4") == 0  # another statistic key
    assert len(fisher) == 2
    other = tmp_path / "other.txt"  # other calibration windows
    other.write_text("\n".join(reversed(calib_text.splitlines())))
    assert _run("allocate", llama_dir, other, *args) == 0
    assert len(fisher) == 3
    capsys.readouterr()


def test_the_code_key_leaves_out_only_stages_no_statistic_reads():
    """corrective.py and scale_tuning.py run after the stored statistics: editing them must not re-price the
    menu, and nothing that computes a statistic may import them (or its changes would go unseen)."""
    import re
    from pathlib import Path

    from exporter.compress import statistics_store

    root = Path(statistics_store.__file__).resolve().parents[1]
    for name in statistics_store.AFTER_STATISTICS:
        assert (root / "compress" / name).is_file(), name
        module = name.removesuffix(".py")
        for folder in statistics_store.CODE:
            for path in (root / folder).glob("*.py"):
                if path.name in statistics_store.AFTER_STATISTICS:
                    continue
                imports = rf"^\s*(from exporter\.compress\.{module} import|import exporter\.compress\.{module}\b" \
                          rf"|from exporter\.compress import .*\b{module}\b)"
                assert not re.search(imports, path.read_text(), re.MULTILINE), (path, module)


def test_the_code_key_leaves_out_calibration_and_tokenizer_whose_output_is_keyed():
    """Editing how calibration windows are drawn must not re-price the menu where the windows come out the same
    (their token ids are in the key): the files left out exist, and no module that computes a statistic imports
    them (it reads their output as data)."""
    import re
    from pathlib import Path

    from exporter.compress import statistics_store

    root = Path(statistics_store.__file__).resolve().parents[1]
    for name in statistics_store.KEYED_BY_OUTPUT:
        assert (root / "source" / name).is_file(), name
        module = name.removesuffix(".py")
        for path in (root / "compress").glob("*.py"):
            imports = rf"^\s*(from exporter\.source\.{module} import|import exporter\.source\.{module}\b" \
                      rf"|from exporter\.source import .*\b{module}\b)"
            assert not re.search(imports, path.read_text(), re.MULTILINE), (path, module)


def test_the_code_key_moves_with_the_statistics_code_only(tmp_path):
    import shutil
    from pathlib import Path

    from exporter.compress import statistics_store

    root = Path(statistics_store.__file__).resolve().parents[1]
    for folder in statistics_store.CODE:
        shutil.copytree(root / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    key = statistics_store.package_digest(tmp_path)
    assert key == statistics_store.code_digest()
    for name in statistics_store.KEYED_BY_OUTPUT:
        with (tmp_path / "source" / name).open("a") as handle:
            handle.write("\n# edited\n")
    for name in statistics_store.AFTER_STATISTICS:
        with (tmp_path / "compress" / name).open("a") as handle:
            handle.write("\n# edited\n")
    assert statistics_store.package_digest(tmp_path) == key
    for path in (tmp_path / "source" / "model.py", tmp_path / "compress" / "gptq.py"):
        path.write_text(path.read_text() + "\n# edited\n")
        assert statistics_store.package_digest(tmp_path) != key
        key = statistics_store.package_digest(tmp_path)
