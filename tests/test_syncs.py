"""run.sync_check's counting (the CUDA sync debug mode itself needs a GPU: the GPU check runs it end to end)."""
import logging
import warnings

import torch

from vssl_ds.engine.syncs import SyncCounter


def _caught(*messages):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in messages:
            warnings.warn(m)
    return caught


def test_counts_synchronisations_by_place_and_passes_other_warnings_on():
    c = SyncCounter(False, torch.device("cpu"))
    c.count(_caught("called a synchronizing CUDA operation", "called a synchronizing CUDA operation"))
    c.count([])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        c.count(_caught("something else entirely"))
    s = c.summary()
    assert s["micro_steps"] == 3 and s["micro_steps_that_wait"] == 1 and s["synchronisations"] == 2
    assert s["per_micro_step"] == round(2 / 3, 3)
    (place, n), = s["places"].items()
    assert place.startswith(__file__) and n == 2
    assert [str(w.message) for w in shown] == ["something else entirely"]


def test_is_off_without_cuda(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    c = SyncCounter(True, torch.device("cpu"))
    assert not c.enabled and "off" in caplog.text
    with c.watch():
        pass
    c.report(tmp_path / "sync_check.json")
    assert c.micro_steps == 0 and not (tmp_path / "sync_check.json").exists()
