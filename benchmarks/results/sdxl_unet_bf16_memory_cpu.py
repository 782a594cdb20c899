"""Peak host memory of the SDXL base UNet (2.57 B parameters) in bfloat16 in diffkern: built on the meta
device, materialised directly in bf16 (random weights at the real config), one forward at 32x32 latents.

    OMP_NUM_THREADS=1 python benchmarks/results/sdxl_unet_bf16_memory_cpu.py OUT.json
"""
import json
import platform
import resource
import sys
import time

import torch

from diffkern.models import UNet2DConditionModel

SDXL_BASE = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


base = rss_gib()
t0 = time.time()
with torch.device("meta"):
    unet = UNet2DConditionModel(**SDXL_BASE)
unet = unet.to_empty(device="cpu").to(torch.bfloat16)  # no float32 copy ever exists
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in unet.parameters():
        p.normal_(0, 0.02, generator=g)
params = sum(p.numel() for p in unet.parameters())
weights_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
after_build = rss_gib()
t1 = time.time()
x = torch.randn(1, 4, 32, 32, dtype=torch.bfloat16)
ctx = torch.randn(1, 77, 2048, dtype=torch.bfloat16)
added = {"text_embeds": torch.randn(1, 1280, dtype=torch.bfloat16),
         "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]], dtype=torch.bfloat16)}
with torch.no_grad():
    out = unet(x, 999, ctx, added_cond_kwargs=added).sample
t2 = time.time()
res = dict(model="SDXL base UNet2DConditionModel (random weights, real config)", parameters=params,
           dtype="bfloat16", weights_gib=round(weights_gib, 3), rss_before_gib=round(base, 3),
           peak_rss_after_build_gib=round(after_build, 3), peak_rss_after_forward_gib=round(rss_gib(), 3),
           forward_latent="1x4x32x32, 77x2048 context",
           forward_finite=bool(torch.isfinite(out.float()).all()),
           build_s=round(t1 - t0, 1), forward_s=round(t2 - t1, 1), torch=torch.__version__,
           machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
           how="OMP_NUM_THREADS=1 python benchmarks/results/sdxl_unet_bf16_memory_cpu.py OUT.json "
               "(ru_maxrss of the process)")
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
