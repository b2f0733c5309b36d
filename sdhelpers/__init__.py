"""sdhelpers: the tested helper package of the book "Stable Diffusion from the inside".

One module per concept, imported explicitly by the chapters:

- ``sdhelpers.device``: device and dtype choice, seeding, memory and timing (the GPU utilities).
- ``sdhelpers.images``: PIL <-> tensors, grids, latent views, masks, PSNR.
- ``sdhelpers.models``: the model registry, the offline CLIP tokenizer, ``load_pipeline``, SD 1.5's architecture.
- ``sdhelpers.data``: the synthetic shapes world TinySD is trained on.
- ``sdhelpers.evaluate``: a pixel-level judge of prompt adherence; grading a pipeline (``python -m sdhelpers.evaluate``).
- ``sdhelpers.model_card``: TinySD's model card, rendered from measured figures.
- ``sdhelpers.clip``: zero-shot classification and similarity matrices with the mini CLIP.
- ``sdhelpers.finetune``: decoder-only VAE fine-tuning, the sd-vae-ft-mse recipe.
- ``sdhelpers.loop``: the source's UNet training loop as small readable steps.
- ``sdhelpers.sampling``: txt2img, img2img and inpainting written out by hand, equal to diffusers.
- ``sdhelpers.attention``: cross-attention maps and a trace of the UNet's blocks.
- ``sdhelpers.widgets``: live ipywidgets explorers.
- ``sdhelpers.gpu``: speed and memory presets, OOM advice.
- ``sdhelpers.bench``: the benchmark harness (``python -m sdhelpers.bench``).
- ``sdhelpers.train``: training the VAE, the mini CLIP and the UNet (``python -m sdhelpers.train``).

Importing the package itself is cheap: it loads no deep-learning library.
"""

__version__ = "0.1.0"
