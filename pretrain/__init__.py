"""loopstack trainer side: configs, distributed runtime, looped models, training."""
