"""E3's min-max calibration takes its range from the strong model's validation images of the
target class (the authors' ~1,000 on CIFAR-10), not from the weak task's few: which images,
how many (``reuse.patching.calibration_images``), and the options that carry it to the job."""

from __future__ import annotations

import argparse

import pytest
import torch

from dnnmod.cli.reuse import image_count
from dnnmod.data.dataset import ImageSet
from dnnmod.errors import ConfigError
from dnnmod.reuse import patching


def image_set(labels: list[int]) -> ImageSet:
    """Images whose first pixel is their position, so a test can tell which were taken."""
    images = torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return ImageSet(images, torch.tensor(labels), ["a", "b", "c"], torch.zeros(3), torch.ones(3))


def test_calibration_images_are_the_strong_validation_images_of_the_target_class():
    strong_val = image_set([0, 2, 1, 2, 2, 0, 2])
    every = patching.strong_calibration_images(strong_val, 2, None)
    assert every.labels.tolist() == [2, 2, 2, 2]
    assert every.images[:, 0, 0, 0].tolist() == [1, 3, 4, 6]
    # A cap takes the first images in the split's (seeded) order; a larger one takes them all.
    assert patching.strong_calibration_images(strong_val, 2, 2).images[:, 0, 0, 0].tolist() == [
        1,
        3,
    ]
    assert len(patching.strong_calibration_images(strong_val, 2, 100)) == 4
    # A class the split holds no image of cannot be calibrated on.
    none = patching.strong_calibration_images(image_set([0, 1]), 2, None)
    with pytest.raises(ConfigError, match="strong model's validation split has none"):
        patching.minmax_calibration(torch.zeros(len(none)))


def test_the_range_comes_from_the_calibration_images_not_the_test_images(monkeypatch):
    calibration, test = image_set([2, 2, 2]), image_set([0, 1, 2, 2])
    scores = {
        id(calibration): torch.tensor([1.0, 3.0, 5.0]),
        id(test): torch.tensor([0.0, 3.0, 5.0, 9.0]),
    }
    monkeypatch.setattr(
        patching,
        "strong_module_scores",
        lambda model, modules, sets, normalization: [scores[id(s)] for s in sets],
    )
    calibrated, record = patching.calibrated_module_scores(None, None, calibration, test, {})
    assert calibrated.tolist() == [-0.25, 0.5, 1.0, 2.0]
    assert record == {"min": 1.0, "max": 5.0, "strong_val_tc_images": 3}


def config_with(**patching_section) -> dict:
    settings = {"s": {"dataset": "digits"}, "m": {"dataset": "digits", "protocol": "moda"}}
    return {"reuse": {"patching": {**patching_section, "settings": settings}}}


def test_the_job_gets_the_configured_count_and_all_by_default():
    assert (
        patching.protocol_arguments(config_with(), "s")
        == "--protocol minmax --calibration-images all"
    )
    assert (
        patching.protocol_arguments(config_with(calibration_images=500), "s")
        == "--protocol minmax --calibration-images 500"
    )
    # MODA's protocol trains a calibration layer on the weak task instead.
    assert "--calibration-images" not in patching.protocol_arguments(config_with(), "m")


def test_the_count_option_takes_a_positive_number_or_all():
    assert image_count("all") is None
    assert image_count("1000") == 1000
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number of images or 'all'"):
            image_count(bad)


@pytest.mark.parametrize(
    ("protocol", "count", "message"),
    [
        ("moda", 10, "protocol 'moda' trains its calibration layer on the weak task's images"),
        ("minmax", 0, "0 images; give at least 1"),
    ],
)
def test_patching_refuses_a_count_it_cannot_use(tmp_path, protocol, count, message):
    with pytest.raises(ConfigError, match=message):
        patching.patch_weak_models(
            tmp_path / "m",
            tmp_path / "s",
            [],
            tmp_path,
            "s",
            protocol=protocol,
            calibration_images=count,
        )
