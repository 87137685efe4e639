"""Using trained models: safetensors serialization, sampling and reranking, evaluation, hub export."""
