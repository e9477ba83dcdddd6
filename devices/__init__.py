"""Device abstraction layer: interfaces, real drivers, simulators (devices.sim)."""
