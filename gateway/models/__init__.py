"""Getting models: pulls from the Hugging Face Hub and the catalog drop-ins they write."""
