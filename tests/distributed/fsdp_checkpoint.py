"""Run by tests/test_distributed.py: ``python fsdp_checkpoint.py OUT``; Lightning starts the second process.

A tiny Llama (random weights, the SmolLM2 architecture shrunk) with 4-bit LSQ QuantLinear layers
trains 2 steps under ``trainer=fsdp`` on 2 CPU processes (gloo), saves a sharded checkpoint,
and a fresh model resumes from it. Each rank writes ``OUT/rank{r}.pt``: its local shards and the
gathered full tensors of every quantizer parameter after training, the full tensors after loading
into the fresh model, and the held-out perplexity both models compute collectively.
"""

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import qat
from qat.config import compose
from qat.lit.module import QATModule
from qat.metrics import perplexity
from qat.quantizers import LSQ


def build() -> QATModule:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    qat.quantize_(model, weight=partial(LSQ, bits=4, granularity="group", group_size=32), include=["model.layers.*"])
    return QATModule(model, optimizer=partial(torch.optim.AdamW, lr=1e-2), total_steps=2)


def trainer(out: Path) -> L.Trainer:
    # qat.config.compose, not Hydra's own: the recipes train.yaml names come from the ConfigStore it fills
    cfg = compose(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2",
                   "trainer.enable_progress_bar=false", f"trainer.default_root_dir={out}"])
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False, val_check_interval=None, limit_val_batches=0)


def quantizer_params(module: QATModule) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.model.named_parameters() if "_quantizer." in n}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    train = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 128, (16,), generator=g)} for _ in range(8)], batch_size=2)
    heldout = torch.randint(0, 128, (4, 16), generator=g)

    module = build()
    t = trainer(out)
    t.fit(module, train_dataloaders=train)
    params = quantizer_params(module)
    result = {
        "placements": {n: [str(pl) for pl in p.placements] for n, p in params.items() if isinstance(p, DTensor)},
        "local": {n: p.to_local().detach().clone() for n, p in params.items()},
        "trained": {n: p.full_tensor().detach().clone() for n, p in params.items()},  # collective: every rank
        "ppl_trained": perplexity(module.model, heldout),
    }
    ckpt = out / "last.ckpt"
    t.save_checkpoint(ckpt)

    fresh = build()
    result["initial"] = {n: p.detach().clone() for n, p in quantizer_params(fresh).items()}
    t2 = trainer(out)
    t2.fit(fresh, train_dataloaders=train, ckpt_path=ckpt)  # max_steps already reached: loads, trains nothing
    result["loaded"] = {n: p.full_tensor().detach().clone() for n, p in quantizer_params(fresh).items()}
    result["ppl_loaded"] = perplexity(fresh.model, heldout)
    result["files"] = sorted(p.name for p in ckpt.iterdir())
    torch.save(result, out / f"rank{t2.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
