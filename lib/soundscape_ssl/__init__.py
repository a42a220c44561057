"""soundscape_ssl: self-supervised learning on passively recorded soundscapes.

The thin, tested library that every numbered notebook calls. One job per module:
`synth` makes the synthetic recorder archive, `archive` inventories a folder of recordings,
`pipeline` runs the numbered notebooks with papermill, `provenance` records what produced
each product.
"""

__version__ = "0.1.0"
