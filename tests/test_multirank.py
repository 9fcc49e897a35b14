"""Edits shared across ranks: two processes (gloo, CPU) launched as two nodes edit the model exactly as
one process given both ranks' records per batch, padding batch included; and what ``run_info`` says
of the optimiser."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import REPO, toy_record, write_jsonl
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.export import read_deltas
from mke_lightning.localization.neurons import NeuronMask

N_RECORDS = 9  # 2 ranks x batch 2: global batches of 4, 4 and 1 (rank 1 pads the last with an empty batch)
TARGETS = ["rome", "berlin", "madrid", "italy", "spain", "germany", "tower", "city", "country"]


def _mask(record_id: str) -> NeuronMask:
    """A mask of its own per record (the united masks of a batch overlap in part)."""
    i = int(record_id[1:])
    return NeuronMask(record_id, {"independent": {0: [i, 20 + i]}, "specific": {0: [40 + i], 1: [3 * i + 1]}})


class EditedWeights(L.Callback):
    """Gives this rank's records their masks (the editor gathers the other ranks'), and writes the MLP output
    projections after every edit batch, the kept edits' record ids and this rank's edits to ``<out_dir>/rank<R>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict[int, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for record in trainer.datamodule.records:
            pl_module.neuron_masks[record.id] = _mask(record.id)
        self.start = self._weights(pl_module)

    @staticmethod
    def _weights(pl_module) -> dict[int, torch.Tensor]:
        model, arch = pl_module.causal_lm, pl_module.arch
        return {l: model.get_submodule(arch.mlp_out_name(l)).weight.detach().clone() for l in range(2)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(self._weights(pl_module))  # before the editor's hook: a batch edit is still in the weights

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"start": self.start, "steps": self.steps, "applied": [ids for ids, _ in pl_module.applied],
                    "edited": {o.record_id: (o.steps, o.loss) for o in pl_module.outcomes}},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _config(tmp_path: Path, model_dir: Path, protocol: str) -> Path:
    records = []
    for i in range(N_RECORDS):
        rec = toy_record(f"r{i}")
        rec["languages"]["en"]["target_new"] = TARGETS[i]  # nine different facts
        records.append(rec)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
        },
        "model": {
            "lm": {"name_or_path": str(model_dir)},
            "protocol": protocol,
            "save_deltas": True,
            "lora": {"merge_scale": 1.0},
            # kl_weight: rank 0 carries the anchors' KL term for the whole batch
            "loss": {"max_steps": 6, "kl_weight": 0.5, "stop_loss": 9.4},  # the first batch stops early
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}},
        },
        "data": {
            "format": "jsonl",
            "path": str(write_jsonl(tmp_path / "nine.jsonl", records)),
            "eval_languages": ["en"],
        },
    }
    path = tmp_path / "multirank.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, out: Path, nodes: int, node_rank: int, batch_size: int, port: int) -> subprocess.Popen:
    """``mke fit`` as one node of ``nodes`` (one device each), as SLURM or a launcher on each node would start it."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "fit",
        "--config",
        str(config),
        "--data.batch_size",
        str(batch_size),
        "--trainer.num_nodes",
        str(nodes),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(out.parent / "runs"),
        "--trainer.logger.name",
        out.name,
        "--trainer.callbacks+=test_multirank.EditedWeights",
        "--trainer.callbacks.out_dir",
        str(out),
    ]
    if nodes > 1:
        args += ["--trainer.strategy", "ddp_editing"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node_rank), LOCAL_RANK="0",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    mke = Path(sys.executable).parent / "mke"
    return subprocess.Popen([str(mke), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(out))


def _wait(procs: list[subprocess.Popen]) -> None:
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


@pytest.mark.parametrize("protocol", ["sequential", "batch"])
def test_two_nodes_edit_exactly_as_one_process_with_the_whole_batch(protocol, tmp_path, tiny_llama_dir):
    config = _config(tmp_path, tiny_llama_dir, protocol)
    port = _free_port()
    # all three at once: one process with batch 4, and two nodes with batch 2 each
    _wait([_launch(config, tmp_path / "one", 1, 0, 4, _free_port()),
           *(_launch(config, tmp_path / "two", 2, r, 2, port) for r in range(2))])
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]

    batches = [[f"r{i}" for i in range(k, min(k + 4, N_RECORDS))] for k in range(0, N_RECORDS, 4)]
    assert (
        sorted(one["edited"])
        == sorted([*ranks[0]["edited"], *ranks[1]["edited"]])
        == [f"r{i}" for i in range(N_RECORDS)]
    )
    for rank in ranks:  # the same number of steps and the same loss (the whole batch's) as one process
        for rid, (steps, loss) in rank["edited"].items():
            assert steps == one["edited"][rid][0] and abs(loss - one["edited"][rid][1]) < 1e-5, rid
    assert (
        len(one["steps"]) == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == len(batches)
    )  # rank 1's last batch is empty
    if protocol == "sequential":
        assert one["applied"] == ranks[0]["applied"] == ranks[1]["applied"] == batches
    else:
        assert one["applied"] == ranks[0]["applied"] == ranks[1]["applied"] == []
    for step, want in enumerate(one["steps"]):
        for layer, w in want.items():
            assert torch.equal(ranks[0]["steps"][step][layer], ranks[1]["steps"][step][layer]), (step, layer)
            assert (ranks[0]["steps"][step][layer] - w).abs().max() < 1e-5, (step, layer)
    assert all(not torch.equal(one["start"][l], one["steps"][0][l]) for l in range(2))  # the edits changed both layers

    # the saved deltas: rank 0 writes each shared edit once, the same files as the single process
    saved = {name: read_deltas([next((tmp_path / "runs" / name).rglob("deltas"))]) for name in ("one", "two")}
    assert [p.name for p, _, _ in saved["one"]] == [p.name for p, _, _ in saved["two"]]
    assert [meta["records"] for _, _, meta in saved["two"]] == batches
    for (_, a, _), (_, b, _) in zip(saved["one"], saved["two"]):
        assert sorted(a.layers) == sorted(b.layers)
        for layer, (idx, values) in a.layers.items():
            assert torch.equal(b.layers[layer][0], idx)
            assert (b.layers[layer][1] - values).abs().max() < 1e-5


def test_the_update_starts_the_same_whatever_was_drawn_before(tiny_llama_dir):
    from mke_lightning.data.records import record_from_dict
    from mke_lightning.editing.masked_lora import LoRAConfig
    from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

    record = record_from_dict(toy_record("r1"), source="toy.jsonl", index=0)
    deltas = []
    for seed in (1, 2):
        ed = KnowledgeEditor(lora=LoRAConfig(merge_scale=1.0), optimizer=partial(torch.optim.Adam, lr=0.05))
        ed.causal_lm, ed.tokenizer, ed.arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
        ed.loss_config.max_steps = 3
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        ed.edit(record, _mask("r1"))
        assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
        deltas.append(ed.causal_lm.get_submodule(ed.arch.mlp_out_name(1)).weight.detach().clone())
    assert torch.equal(deltas[0], deltas[1])


def test_run_info_names_the_optimiser_of_any_factory():
    want = {"class_path": "torch.optim.adam.Adam"}
    for factory in (lambda p: torch.optim.Adam(p, lr=0.05), partial(torch.optim.Adam, lr=0.05)):
        got = KnowledgeEditor(optimizer=factory).run_info()["settings"]["optimizer"]
        assert got["class_path"] == want["class_path"] and got["init_args"]["lr"] == 0.05
        assert got["init_args"]["betas"] == [0.9, 0.999]
    assert KnowledgeEditor().run_info()["settings"]["optimizer"]["init_args"]["lr"] == 0.001  # the default class

    from mke_lightning.cli import MKECLI
    from mke_lightning.data import EditDataModule

    cli = MKECLI(KnowledgeEditor, EditDataModule, run=False,
                 args=["--config", str(REPO / "configs" / "demo.yaml"), "--model.optimizer.init_args.lr", "0.02",
                       "--trainer.logger", "false"])
    got = cli.model.run_info()["settings"]["optimizer"]
    assert got["class_path"] == "torch.optim.Adam" and got["init_args"]["lr"] == 0.02  # as the CLI was given it
