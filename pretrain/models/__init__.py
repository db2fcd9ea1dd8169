"""Looped transformer family built on megatron-core tensor-parallel layers."""
