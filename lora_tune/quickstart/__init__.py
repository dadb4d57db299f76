"""The offline quickstart: a made-up world and tiny models built locally."""
