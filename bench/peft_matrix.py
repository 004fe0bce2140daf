"""peft's own test matrix through ``fastpeft.from_peft``: how much of peft's LoRA / IA3 surface converts.

Runs the LoRA and IA3 rows of ``TEST_CASES`` in peft's ``tests/test_custom_models.py`` (its tiny
models, built by its ``MockTransformerWrapper``, with its ``set_init_weights_false`` so adapters are
not the identity), each as peft's tests build it: ``get_peft_model(model, config)`` in eval mode, on
peft's test input ``arange(90).view(9, 10)``.  Each case is then converted with ``from_peft`` and
sorted into one of:

    converted   every peft layer became a fastpeft layer, outputs equal peft's (rel. err. < 1e-5)
    partial     some layers converted, the others left on peft's path (with from_peft's warning),
                outputs equal peft's
    left        nothing converted: every peft layer left on peft's path (warning), outputs equal
    refused     from_peft raised (NotImplementedError / ValueError / ...: a feature fastpeft refuses)
    wrong       from_peft returned but the outputs differ from peft's (a bug: should be 0)

and, for converted / partial cases, the gradient of every trainable parameter (of sum(out · g)) is
compared with peft's too (a "wrong" when it differs).

peft's tests are not part of the peft wheel: give the ``tests`` folder of a peft checkout
(``git clone https://github.com/huggingface/peft``; the version should match the installed peft).
Modules its test helpers import but these cases never use (diffusers, datasets) are stubbed.

    python bench/peft_matrix.py --peft-tests /path/to/peft/tests [--json out.json] [-v]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import torch

import fastpeft
from fastpeft.tools.equivalence import rel_err

TOL = 1e-5
_STUBBED = ("diffusers", "diffusers.utils", "diffusers.utils.testing_utils", "datasets")


class _Stub(types.ModuleType):
    """A module whose every attribute is a dummy class (names imported at module level, never used)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def load_peft_tests(tests_dir: Path):
    """peft's ``tests.test_custom_models`` and ``tests.testing_utils`` (imported as a package)."""
    if not (tests_dir / "test_custom_models.py").is_file():
        raise FileNotFoundError(f"no test_custom_models.py in {tests_dir} (give peft's tests folder)")
    sys.path.insert(0, str(tests_dir.parent))
    for name in _STUBBED:
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = _Stub(name)
    import tests.test_custom_models as custom
    import tests.testing_utils as utils

    return custom, utils


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if hasattr(out, "logits") else out[0]


def _peft_layers(model, custom) -> list[str]:
    kinds = (custom.BaseTunerLayer, custom.AuxiliaryTrainingWrapper)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _grads(model, x, g) -> dict:
    model.zero_grad(set_to_none=True)
    (_output(model(**x)).float() * g).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def run_case(custom, utils, case) -> dict:
    name, model_id, config_cls, kwargs = case
    kwargs = utils.set_init_weights_false(config_cls, dict(kwargs))
    model = custom.MockTransformerWrapper.from_pretrained(model_id)
    pm = custom.get_peft_model(model, config_cls(**kwargs)).eval()
    x = {"X": torch.arange(90).view(9, 10)}
    with torch.no_grad():
        y_peft = _output(pm(**x)).detach().clone()
    g = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(pm)  # peft's gradients, on an unconverted copy
    try:
        peft_grads = _grads(twin, x, g)
    except Exception:  # noqa: BLE001 - some of peft's tiny models have nothing trainable on this input
        peft_grads = None
    before = _peft_layers(pm.base_model.model, custom)
    row = {"case": name, "model": model_id, "config": config_cls.__name__, "peft_layers": len(before)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            root = fastpeft.from_peft(pm)
        except Exception as exc:  # noqa: BLE001 - every refusal is counted, whatever its type
            row.update(status="refused", detail=f"{type(exc).__name__}: {str(exc)[:200]}")
            return row
    messages = [str(w.message) for w in caught if "from_peft" in str(w.message)]
    left = _peft_layers(root, custom)
    converted = sum(isinstance(m, fastpeft.PEFTLinear) for m in root.modules())
    with torch.no_grad():
        y = _output(root(**x))
    err = rel_err(y, y_peft)
    row.update(converted_layers=converted, left_layers=len(left), rel_err=err, detail="; ".join(messages)[:300])
    if not err < TOL:
        row["status"] = "wrong"
        return row
    if peft_grads is not None:
        ours = _grads(root, x, g)
        bad = [n for n, v in peft_grads.items()
               if n in _rename(ours, n) and not rel_err(_rename(ours, n)[n].reshape(-1), v.reshape(-1)) < TOL]
        if bad:
            row.update(status="wrong", detail=f"gradients differ: {bad[:3]}")
            return row
    row["status"] = "converted" if not left else ("partial" if converted else "left")
    return row


def _rename(ours: dict, peft_name: str) -> dict:
    """{peft's parameter name: our gradient} for the one name (fastpeft's attribute names differ:
    ``lora_A.default.weight`` -> ``lora_A``, ``base_layer.bias`` -> ``bias``, IA3's ``ia3_l.default``
    -> ``ia3_in`` / ``ia3_out``)."""
    n = peft_name.replace("base_model.model.", "", 1)
    for old, new in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                     (".lora_B.default.bias", ".lora_bias"), (".base_layer.", "."),
                     (".lora_magnitude_vector.default.weight", ".dora_magnitude")):
        n = n.replace(old, new)
    if n.endswith(".ia3_l.default"):
        stem = n[:-len(".ia3_l.default")]
        for cand in (f"{stem}.ia3_in", f"{stem}.ia3_out"):
            if cand in ours:
                return {peft_name: ours[cand].reshape(-1)}
        return {}
    return {peft_name: ours[n]} if n in ours else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-tests", type=Path, required=True, help="the tests/ folder of a peft checkout")
    parser.add_argument("--json", type=Path, help="write every case's row here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    custom, utils = load_peft_tests(args.peft_tests)
    cases = [c for c in custom.TEST_CASES if c[2].__name__ in ("LoraConfig", "IA3Config")]
    rows = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                row = run_case(custom, utils, case)
            except Exception as exc:  # noqa: BLE001 - peft itself failed to build the case here
                row = {"case": case[0], "status": "peft-error", "detail": f"{type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        if args.verbose:
            print(f"{row['status']:>10}  {row['case']}: {row.get('detail', '')[:150]}")
    counts = Counter(r["status"] for r in rows)
    print(f"peft {custom.__name__} LoRA/IA3 cases: {len(rows)}")
    for status in ("converted", "partial", "left", "refused", "wrong", "peft-error"):
        print(f"  {status:>10}: {counts.get(status, 0)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 1 if counts.get("wrong") else 0


if __name__ == "__main__":
    sys.exit(main())
