"""sdhelpers: the tested helper package of the book "Stable Diffusion from the inside".

One module per concept, imported explicitly by the chapters:

- ``sdhelpers.device``: device and dtype choice, seeding, memory and timing (the GPU utilities).
- ``sdhelpers.images``: PIL <-> tensors, grids, latent views, masks, PSNR.
- ``sdhelpers.models``: the model registry, the offline CLIP tokenizer, ``load_pipeline``, SD 1.5's architecture.
- ``sdhelpers.data``: the synthetic shapes world TinySD is trained on.
- ``sdhelpers.evaluate``: a pixel-level judge of prompt adherence.

Importing the package itself is cheap: it loads no deep-learning library.
"""

__version__ = "0.1.0"
