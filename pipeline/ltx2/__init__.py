"""LTX-2.0 from diffusers into our formats: the key map (keymap), our ModelConfig from its
config.json (config), the shard-by-shard importer (importer) and `omniforcing import ltx2` (cli).
The network itself is model/ (arch "ltx2"); this package is the only one that knows diffusers'
names."""
