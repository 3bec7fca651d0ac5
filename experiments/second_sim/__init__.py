"""A second, independent test simulator per system (issue 23), for testing only.

Written from the literature and the shared file conventions alone (axes, units, label
codes), without reading the training simulators; never imported by ``smlm_jax`` or by
training. Modules:
* ``sparks_sim``: confocal xy-t Ca2+ movies of Fluo dye-loaded cardiomyocytes with
  sparks, puffs and waves; labels, instances and an event list (README.md).
* ``fusion_sim``: single-view light-sheet volumes and the multiview-fused target.
* ``common``: file writing (uint16 ADU ImageJ TIFF, JSON sidecars) and the CLI frame.
Both simulators are plain numpy/scipy; each has ``simulate_*(seed, ...)`` returning
arrays and metadata and a ``main()`` CLI (``--out --num --seed [--tiny]``).
"""
