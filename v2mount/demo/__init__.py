"""Demo models served by ``uvicorn v2mount:app`` when no repository is configured."""
