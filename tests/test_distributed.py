"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 (``fully_shard`` per block).

Each rank takes half of one fixed batch; after two steps both ranks hold the same parameters,
equal to one process training on the whole batch (every loss is a batch mean and both wrappers
average gradients over ranks, so the two halves' mean gradient is the full batch's).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmdit import tiny, train
from mmdit.tiny import recipe, shapes

pytestmark = pytest.mark.slow  # compiles, several processes or subprocesses

WORLD = 2
BATCH = 4  # per step, over both ranks
STEPS = 2
SMALL = dict(num_layers=2, num_heads=2, head_dim=16, context_dim=32, pooled_dim=32)
SMALL_TEXT = dict(width=32, num_heads=2, mlp_dim=64)


def make_model():
    transformer, conditioner = tiny.build_tiny(0, transformer=SMALL, text=SMALL_TEXT)
    with torch.no_grad():  # leave adaLN-zero so that every parameter sees a gradient
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return recipe.TextToImage(transformer, conditioner)


def batches():
    """STEPS fixed full batches (x0, ids, sigma, noise) at 16x16 (4x4 tokens)."""
    out = []
    for i in range(STEPS):
        data = shapes.batch(BATCH, 100 + i, size=16)
        g = torch.Generator().manual_seed(i)
        ids = tiny.WordTokenizer.from_words(shapes.all_words())(data.captions, tiny.MAX_LENGTH)
        out.append((data.images, ids, train.sample_sigma(BATCH, generator=g, shift=3.0),
                    torch.randn(data.images.shape, generator=g)))
    return out


def run_steps(model, rows: slice, params):
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    for x0, ids, sigma, noise in batches():
        loss = model(x0[rows], ids[rows], sigma[rows], noise[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model) -> dict:
    """Parameters as plain tensors (FSDP2 keeps DTensor shards: gather them)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def worker(rank: int, mode: str, folder: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        wrapped = train.distribute(model, mode, blocks=train.transformer_blocks(model.transformer))
        half = BATCH // WORLD
        run_steps(wrapped, slice(rank * half, (rank + 1) * half), wrapped.parameters())
        torch.save(full_state(model), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, mode):
    mp.spawn(worker, args=(mode, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_model()  # one thread, as in the workers (conftest sets it here)
    start = full_state(single)
    run_steps(single, slice(0, BATCH), single.parameters())
    expected = full_state(single)

    assert ranks[0].keys() == expected.keys()
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # the steps did something
    for k in expected:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{mode}: ranks differ at {k}"
        err = (ranks[0][k] - expected[k]).abs().max().item()
        assert err <= 1e-5 * max(1.0, expected[k].abs().max().item()), f"{mode}: {k} off by {err}"
