"""The shared mechanisms every stage uses, in the lowest layer (nothing here imports from above):

* `audio`: the one audio reader: decode in blocks, mix to mono, the one resampler, the one
  window rule (offset_s, valid_s, padded), faults isolated;
* `stage`: the one resumable, rank-sharded stage runner (plan, units, claims, verified done
  markers, finalise) and the one atomic write;
* `config`: the one strict path from mappings, files and command-line flags to stage dataclasses;
* `cli`: how every command fails (one line and an exit code);
* `stats`: group bootstrap, intervals that say how they were made, paired differences, NMI/ARI;
* `provenance`: what produced a product (config.json, git state, package versions, hardware).
"""
