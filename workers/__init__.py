"""Code that runs inside Ray processes: thin adapters between Ray APIs and models/."""
