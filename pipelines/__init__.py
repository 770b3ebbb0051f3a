"""Driver side: typed stage configs, the stages (run(cfg) -> Result), the workflow and the CLI."""
