"""The data package every job reads through. Imports point down this list:

- :mod:`~rcmae.core.data.shards` (the shard reader), :mod:`~rcmae.core.data.folder` (the ImageFolder
  reader), :mod:`~rcmae.core.data.demo` (the demo sets built from scikit-image's photos);
- :mod:`~rcmae.core.data.readers`: the factory over the storage formats, and the label spaces;
- :mod:`~rcmae.core.data.sampler`: seeding, the resumable training sampler, the exact evaluation loader;
- :mod:`~rcmae.core.data.transforms`, :mod:`~rcmae.core.data.gpu` and
  :mod:`~rcmae.core.data.pipelines`: evaluation, fine-tuning and pretraining transforms (CPU and GPU);
- :mod:`~rcmae.core.data.datasets`: seeded datasets over any reader, and the sets each job builds;
- :mod:`~rcmae.core.data.shard_writer`: writing a tree as shards (``tools/make_shards.py``).
"""
