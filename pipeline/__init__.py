"""enrich: enrich datasets with LLM answers."""
