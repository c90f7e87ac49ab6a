"""The teacher's forward pass: `build` fills the Zarr store once (drivekd-cache build); `online`
computes the same targets in memory, for tests and tools that need no store on disk."""
