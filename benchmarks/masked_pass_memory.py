"""Peak memory of a many-candidate masked pass: P candidate masks over a set of images.

CNNSplitter scores a population of P = 100 candidate modules at once. The naive way sends
every image through all P modules in one pass (256·P repeated images); the shared inference
path (dnnmod.modules.inference) chunks over images and modules within a memory budget. Each
measurement runs in a fresh process and reads its peak resident memory (ru_maxrss); the
baseline is the same process after loading the model and the images, before the pass.

    python benchmarks/masked_pass_memory.py [--arch vgg16] [--width 1.0] [--candidates 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(arch: str, width: float, candidates: int, images: int, threads: int) -> dict:
    import torch

    from dnnmod.data import ImageSet
    from dnnmod.models import build_model
    from dnnmod.modules.inference import activation_bytes_per_image, plan_pass, run
    from dnnmod.modules.structure import trace_structure

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, 10, width).eval()
    structure = trace_structure(model)
    masks = {group.name: torch.rand(candidates, group.size) < 0.5
             for group in structure.conv_groups}
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    image_set = ImageSet(pixels, torch.zeros(images, dtype=torch.long), [str(i) for i in range(10)],
                         torch.full((3,), 0.5), torch.full((3,), 0.25))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = plan_pass(model, (1, 3, 32, 32), candidates, "cpu")
    started = time.perf_counter()
    logits = run(model, image_set, structure=structure, masks=masks)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_image = activation_bytes_per_image(model, (1, 3, 32, 32))
    return {"arch": arch, "width": width, "candidates": candidates, "images": images,
            "output_shape": list(logits.shape), "plan_modules": plan.modules,
            "plan_images": plan.images, "repeated_images_per_pass": plan.modules * plan.images,
            "naive_repeated_images": candidates * images,
            "estimated_naive_activation_gib": per_image * candidates * images / 2**30,
            "baseline_rss_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "pass_extra_mib": (peak - before) / 1024, "seconds": seconds,
            "images_per_second": candidates * images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.arch, args.width, args.candidates, args.images,
                                 args.threads)))
        return
    # A fresh process, so that ru_maxrss is this pass's peak and nothing else's.
    child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=True,
                           capture_output=True, text=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
