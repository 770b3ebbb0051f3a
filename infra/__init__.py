"""Distributed and cluster glue: configs, DeepSpeed, Ray runtime, local services. Never imports models/."""
