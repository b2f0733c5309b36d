"""sdhelpers: the tested helper package of the book "Stable Diffusion from the inside".

One module per concept, imported explicitly by the chapters.

Running models:

- ``sdhelpers.device``: device and dtype choice, seeding, memory and timing (the GPU utilities).
- ``sdhelpers.libraries``: library versions, and silencing their chatter.
- ``sdhelpers.checks``: the argument checks every public function runs once, at its entrance.
- ``sdhelpers.models``: the model registry, the offline CLIP tokenizer, ``load_pipeline``.
- ``sdhelpers.architectures``: SD 1.5, SD 2.1, SDXL and TinySD built from their configs (``sdhelpers.configs``),
  on the meta device.
- ``sdhelpers.gpu``: speed and memory presets (checked by ``sdhelpers.preset_checks``), OOM advice
  (``sdhelpers.gpu_memory``).
- ``sdhelpers.bench``, ``bench_measure`` and ``bench_report``: the benchmark harness (``python -m sdhelpers.bench``),
  how one preset is measured, and the stored runs.

Pictures and prompts:

- ``sdhelpers.images``: grids with labels, enlargements, differences, PSNR; ``sdhelpers.masks``: inpainting masks.
- ``sdhelpers.pixels``, ``latent_views``, ``sketches``: conversions, latent viewers and sketches, re-exported by ``sdhelpers.images``.
- ``sdhelpers.data``: the synthetic shapes world TinySD is trained on (drawn by ``sdhelpers.drawing``);
  ``sdhelpers.shapes_dataset``: it as a PyTorch dataset of image–caption pairs.
- ``sdhelpers.judge``: a pixel-level judge of prompt adherence.
- ``sdhelpers.evaluate``: the networks' metrics and grading a pipeline (``python -m sdhelpers.evaluate``).
- ``sdhelpers.targets``: the quality bar TinySD is held to, read from what was measured.
- ``sdhelpers.clip``: zero-shot classification and similarity matrices with the mini CLIP.
- ``sdhelpers.sampling``: txt2img, img2img and inpainting written out by hand, equal to diffusers;
  ``sdhelpers.schedulers``: the samplers by name.
- ``sdhelpers.guidance``: why strong guidance breaks a small model (the branch gap), and limited-interval guidance.
- ``sdhelpers.attention``: cross-attention maps and a trace of the UNet's blocks.
- ``sdhelpers.unet_diagram``: the UNet's blocks and one CrossAttnDownBlock2D drawn from the config
  (``sdhelpers.unet_layout`` computes what it draws).
- ``sdhelpers.widgets``: live ipywidgets explorers; ``sdhelpers.studio``: txt2img, img2img and inpainting
  in one app (its widgets in ``sdhelpers.studio_app``).
- ``sdhelpers.tables``: tables that render as tables on the book's pages.

Training:

- ``sdhelpers.recipe``: TinySD's training recipes (the shipped TinySD 2's and the first one's).
- ``sdhelpers.objectives``: the VAE, contrastive CLIP and noise-prediction losses.
- ``sdhelpers.latents``: the latent cache the UNet trains on.
- ``sdhelpers.fit``: the one training loop, its optimiser and its checkpoint format.
- ``sdhelpers.loop``: the source's UNet training loop as small readable steps.
- ``sdhelpers.finetune``: decoder-only VAE fine-tuning, the sd-vae-ft-mse recipe.
- ``sdhelpers.train``: the three stages and ``python -m sdhelpers.train``; ``sdhelpers.export``: the
  pipeline folder it writes; ``sdhelpers.checkpoint``: atomic safetensors files.
- ``sdhelpers.model_card``: TinySD's model card, rendered from measured figures; ``sdhelpers.levers``: its table of
  the recipe variants measured.

Importing the package itself is cheap: it loads no deep-learning library.
"""

__version__ = "0.1.0"
