"""Research harness: controlled sweeps of looped variants (`loopstack research`); see docs/research/."""
