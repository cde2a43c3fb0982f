"""Where the filter's arrays live: particle and series shardings.

The filter states only where the particle axis (and, for many series, the series axes) of its
arrays live, through `jax.lax.with_sharding_constraint`; XLA propagates the rest.
"""

import jax

__all__ = ["particle_constraint"]


def particle_constraint(
    particle_sharding: jax.sharding.Sharding | None,
    series_sharding: jax.sharding.NamedSharding | None,
    batch_shape: tuple[int, ...],
    num_particles: int,
):
    """The function that constrains arrays `(N, *batch_shape, ...)` to the given shardings.

    Returns:
        A function of one array, or None when neither sharding is given.

    Raises:
        TypeError: `particle_sharding` is not a `Sharding`, `series_sharding` not a
            `NamedSharding`.
        ValueError: `series_sharding` without `batch_shape`, particles or series that do not
            split evenly, or shardings on different meshes.
    """
    if particle_sharding is not None and not isinstance(particle_sharding, jax.sharding.Sharding):
        raise TypeError(
            "particle_sharding must be a jax.sharding.Sharding (e.g. a NamedSharding over the "
            f"particle axis) or None; got {particle_sharding!r}."
        )
    if series_sharding is not None and not batch_shape:
        raise ValueError(
            "series_sharding splits the series axes: it needs batch_shape=(S,) (many series)."
        )
    if series_sharding is not None:
        sharding = _series_sharding(series_sharding, particle_sharding, batch_shape, num_particles)
    elif particle_sharding is not None:
        sharding = _auto_sharding(particle_sharding, num_particles)
    else:
        return None

    def constrain(array):
        return jax.lax.with_sharding_constraint(array, sharding)

    return constrain


def _series_sharding(
    series_sharding: object,
    particle_sharding: jax.sharding.Sharding | None,
    batch_shape: tuple[int, ...],
    num_particles: int,
) -> jax.sharding.Sharding:
    """The sharding of `(N, *B, ...)` arrays from the series (and particle) shardings."""
    if not isinstance(series_sharding, jax.sharding.NamedSharding):
        raise TypeError(
            "series_sharding must be a jax.sharding.NamedSharding naming the mesh axis of the "
            f"series, e.g. NamedSharding(mesh, PartitionSpec('series')); got {series_sharding!r}."
        )
    try:
        series_sharding.shard_shape(batch_shape)
    except ValueError as error:
        raise ValueError(
            f"batch_shape={batch_shape} does not split evenly over series_sharding "
            f"{series_sharding}: choose a number of series divisible by the number of shards."
        ) from error
    spec = tuple(series_sharding.spec) + (None,) * (len(batch_shape) - len(series_sharding.spec))
    particle_axis = None
    if particle_sharding is not None:
        if not (
            isinstance(particle_sharding, jax.sharding.NamedSharding)
            and particle_sharding.mesh.shape == series_sharding.mesh.shape
            and particle_sharding.mesh.axis_names == series_sharding.mesh.axis_names
        ):
            raise ValueError(
                "particle_sharding and series_sharding together must be NamedShardings on the "
                "same mesh, e.g. a mesh with axes ('particles', 'series')."
            )
        particle_axis = tuple(particle_sharding.spec)[0] if particle_sharding.spec else None
    combined = jax.sharding.NamedSharding(
        series_sharding.mesh, jax.sharding.PartitionSpec(particle_axis, *spec)
    )
    if particle_axis is not None:
        try:
            combined.shard_shape((num_particles, *batch_shape))
        except ValueError as error:
            raise ValueError(
                f"num_particles={num_particles} does not split evenly over particle_sharding "
                f"{particle_sharding}: choose num_particles divisible by the number of shards."
            ) from error
    return _auto_axes(combined)


def _auto_sharding(sharding: jax.sharding.Sharding, num_particles: int) -> jax.sharding.Sharding:
    """Check that the particle axis splits evenly; give a named mesh JAX's automatic axes.

    `jax.make_mesh` makes explicit-mode axes by default, which `with_sharding_constraint`
    refuses; the filter only states where the particle axis lives and lets XLA propagate the
    rest, so the same devices and axis names are re-wrapped as automatic axes.
    """
    try:
        sharding.shard_shape((num_particles,))
    except ValueError as error:
        raise ValueError(
            f"num_particles={num_particles} does not split evenly over particle_sharding "
            f"{sharding}: choose num_particles divisible by the number of particle shards."
        ) from error
    return _auto_axes(sharding)


def _auto_axes(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        auto = jax.sharding.AxisType.Auto
        if any(axis_type != auto for axis_type in mesh.axis_types):
            mesh = jax.sharding.Mesh(
                mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names)
            )
            sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    return sharding
