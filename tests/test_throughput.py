"""The throughput callback (issue 15): its FLOP count agrees with an independent forward + backward count, its rates
and projections follow from what it timed, it logs perf/* through the loggers, and bad settings are refused."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_sync_free_step import batches, fit, module

from ldm.callbacks.throughput import MAX_MARKS, Throughput
from ldm.utils.flops import bf16_peak_flops, count_flops

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_flops_agree_with_a_counted_forward_and_backward() -> None:
    m = module()
    ours = m.training_flops_per_sample((8, 8))
    z = torch.randn(1, 4, 8, 8)
    cond = m.text_encoder.encode(["a red square"])
    t = torch.full((1,), 0.5)
    counted = count_flops(lambda: m.backbone(z, t, cond).square().mean().backward())
    # backward = 2 x forward for every matmul/conv except that the input's gradient is not needed at the first layer
    assert 0.85 * ours <= counted <= ours


def test_rates_and_projections_follow_from_the_timing() -> None:
    cb = Throughput(peak_tflops=100.0, price_per_gpu_hour=3.0)
    cb._start, cb._samples, cb._steps, cb._flops = time.perf_counter() - 10.0, 200, 50, 4e14
    trainer = SimpleNamespace(world_size=2, max_steps=1000)
    m = cb.measure(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert m["perf/images_per_s"] == pytest.approx(40.0, rel=1e-3)  # 200 per device x 2 devices / 10 s
    assert m["perf/seconds_per_step"] == pytest.approx(0.2, rel=1e-3)
    assert m["perf/tflops_per_device"] == pytest.approx(40.0, rel=1e-3)
    assert m["perf/mfu"] == pytest.approx(0.4, rel=1e-3)
    assert m["perf/gpu_hours_projected"] == pytest.approx(1000 * 0.2 * 2 / 3600, rel=1e-3)
    assert m["perf/cost_projected"] == pytest.approx(3.0 * m["perf/gpu_hours_projected"])


def test_no_mfu_without_a_known_peak() -> None:
    assert bf16_peak_flops(torch.device("cpu")) is None
    cb = Throughput()
    cb._start, cb._samples, cb._steps, cb._flops = time.perf_counter() - 1.0, 10, 5, 1e9
    m = cb.measure(SimpleNamespace(world_size=1, max_steps=-1), SimpleNamespace(device=torch.device("cpu")))
    assert "perf/mfu" not in m and "perf/gpu_hours_projected" not in m and m["perf/tflops_per_device"] > 0


def test_a_run_logs_perf_metrics(tmp_path) -> None:
    cb = Throughput(peak_tflops=1.0, warmup_steps=1)
    fit(module(), batches(9), [cb], log_every=4, logger=CSVLogger(tmp_path, name="", version=""))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    perf = [r for r in rows if r.get("perf/images_per_s")]
    assert [int(r["step"]) for r in perf] == [3, 7]  # the logging steps, on Lightning's axis
    for r in perf:
        assert float(r["perf/images_per_s"]) > 0 and float(r["perf/mfu"]) == pytest.approx(
            float(r["perf/tflops_per_device"]) / 1.0)
    assert cb._base[0] == (8, 8)


@pytest.mark.parametrize("kwargs", [dict(price_per_gpu_hour=-1.0), dict(peak_tflops=0.0), dict(warmup_steps=-1)])
def test_bad_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="Throughput:"):
        Throughput(**kwargs)


class _Clock:
    """A host clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_the_forward_backward_share_is_what_the_step_spent_there(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step: forward 2, backward 1, then 1 in the optimizer hook (outside): a share of 3/4 in every report."""
    import lightning.pytorch as L
    from conftest import Lin

    import ldm.callbacks.throughput as throughput

    clock = _Clock()
    monkeypatch.setattr(throughput, "time", clock)

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            clock.now += 1.0
            return grad

    class Timed(Lin):
        def training_step(self, batch, batch_idx):
            clock.now += 2.0
            return SlowBackward.apply(super().training_step(batch, batch_idx))

    class Outside(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            clock.now += 1.0

    trainer = L.Trainer(max_steps=9, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=4,
                        callbacks=[Outside(), Throughput(warmup_steps=1)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Timed(), train_dataloaders=torch.utils.data.DataLoader([torch.randn(8, 3) for _ in range(9)],
                                                                       batch_size=None))
    shares = [float(r["perf/fwd_bwd_share"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))
              if r.get("perf/fwd_bwd_share")]
    assert shares == [0.75, 0.75]


def test_the_share_keeps_the_latest_steps_between_rare_reports() -> None:
    cb = Throughput(warmup_steps=0)
    trainer, module = SimpleNamespace(global_step=5), SimpleNamespace(device=torch.device("cpu"))
    for _ in range(MAX_MARKS + 10):
        cb.on_train_batch_start(trainer, module, None, 0)
        cb.on_after_backward(trainer, module)
    assert len(cb._marks) == MAX_MARKS
    assert cb._fwd_bwd_share(time.perf_counter()) is not None and cb._marks == []  # read, then cleared
