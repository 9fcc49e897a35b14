"""A method registered from outside the package edits a model through `mke fit`, and the editor
never asks for a method by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mke_lightning.cli import cli_main
from mke_lightning.editing.methods import EditMethod, method_class, method_names, register
from mke_lightning.editing.neuron_delta import NeuronDelta
from test_cli import _toy_args

REPO = Path(__file__).resolve().parents[1]


class _BiasOnOneNeuron:
    """A trainable update of neuron 0's value vector at the last layer (the handle protocol of trained methods)."""

    def __init__(self, editor) -> None:
        out = editor.causal_lm.get_submodule(editor.arch.mlp_out_name(-1 % editor.causal_lm.config.num_hidden_layers))
        self.value = torch.nn.Parameter(torch.zeros(out.weight.shape[0]))  # [d_model]
        self.hook = out.register_forward_hook(lambda m, args, y: y + args[0][..., :1] * self.value)
        self.layer = editor.causal_lm.config.num_hidden_layers - 1

    def parameters(self):
        return [self.value]

    def count(self) -> int:
        return 1

    def clamp_norms(self) -> None:
        pass

    def to_delta(self) -> NeuronDelta:
        self.hook.remove()
        return NeuronDelta({self.layer: (torch.tensor([0]), self.value.detach()[None].clone())})

    def discard(self) -> None:
        self.hook.remove()


@register
class OneNeuron(EditMethod):
    name = "one_neuron_test"

    @property
    def needs_masks(self) -> bool:
        return False

    def attach(self, mask):
        return _BiasOnOneNeuron(self.editor)


def test_a_method_registered_outside_the_package_edits_through_mke_fit(tmp_path, tiny_llama_dir):
    assert method_class("one_neuron_test") is OneNeuron and "one_neuron_test" in method_names()
    args = _toy_args(tmp_path, tiny_llama_dir) + ["--model.method", "one_neuron_test", "--model.save_deltas", "true"]
    cli = cli_main(args)
    assert [o.neurons for o in cli.model.outcomes] == [1, 1]
    assert all(o.steps >= 1 and o.failed is None for o in cli.model.outcomes)
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["method"] == "one_neuron_test"
    deltas = sorted((tmp_path / "runs").rglob("deltas/*.safetensors"))
    assert len(deltas) == 2
    moved = NeuronDelta.load(deltas[0])
    assert list(moved.layers) == [1] and moved.layers[1][1].abs().sum() > 0  # the trained value vector was saved


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'memla' is taken"):
        register(type("Other", (EditMethod,), {"name": "memla"}))


def test_no_generic_code_branches_on_an_edit_method_name():
    names = "\\|".join(["memla", "lora", "ft_l", "lafn", "rome", "memit", "alphaedit"])
    pattern = rf"method\(_name\)\? *\(==\|!=\|in\) *[(\[]\?[\"']\({names}\)"  # e.g. self.method == "lafn"
    found = subprocess.run(
        ["grep", "-rn", pattern, "mke_lightning", "callbacks"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert [line for line in found.splitlines() if "/methods/" not in line] == []


def test_the_top_level_names_import_lazily():
    code = (
        "import sys, mke_lightning as m; assert 'mke_lightning.editing.editor' not in sys.modules; "
        "from mke_lightning import KnowledgeEditor, EditDataModule, NeuronLocalization, register_method; "
        "assert KnowledgeEditor.__module__ == 'mke_lightning.editing.editor' "
        "and register_method is m.editing.methods.register"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fit_help_shows_the_config_fields_docstrings_and_choices():
    done = subprocess.run([sys.executable, "-m", "mke_lightning.cli", "fit", "--model.lora.help", "LoRAConfig"],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:  # no __main__ in the module: the console script
        done = subprocess.run([str(Path(sys.executable).parent / "mke"), "fit", "--model.lora.help", "LoRAConfig"],
                              capture_output=True, text=True, cwd=REPO)
    assert "LoRA rank per layer = rank_factor x located neurons" in done.stdout
    assert "{auto,merge,on_top}" in done.stdout


def test_mke_help_lists_every_subcommand():
    mke = str(Path(sys.executable).parent / "mke")
    out = subprocess.run([mke, "--help"], capture_output=True, text=True, cwd=REPO).stdout
    listed = out.split("Available subcommands:")[1]
    for name in ("fit", "validate", "test", "localize", "report", "export", "key-stats"):
        assert f"\n    {name} " in listed, name
    assert "usage" in subprocess.run([mke, "key-stats", "--help"], capture_output=True, text=True, cwd=REPO).stdout
