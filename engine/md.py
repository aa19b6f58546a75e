"""Batched molecular dynamics: B independent systems integrated at once, one model call per step.

Units: positions Å, velocities Å/fs, masses amu, energies eV, forces eV/Å, time fs, temperature K.
Acceleration a = F/m × ase.units.fs² (Å/fs² per eV/(Å·amu)); kinetic energy = ½ m v² / ase.units.fs².

Integrators (one force evaluation per step):
- "verlet": velocity Verlet (NVE).
- "langevin": BAOAB splitting (Leimkuhler & Matthews): half kick, half drift, exact Ornstein-Uhlenbeck
  velocity update v <- c1 v + sqrt((1 - c1²) kT/m) ξ with c1 = exp(-γ dt), half drift, new forces, half kick.
  Friction γ in 1/fs; every atom thermostatted, each system to its own target temperature.

Neighbor list: with skin = 0 (default) it is rebuilt from the positions on every step. With skin > 0 a list
to cutoff + skin is built and reused (Verlet list): each step keeps only its pairs within the cutoff, so
the model sees exactly the graph a fresh list would give, and the list is rebuilt when any atom of the
batch has moved more than skin/2 since the last build. Models that build their own neighbor list
(engine.runner.FusedStudent) are called on the positions alone. Positions are not wrapped into the cell
(the neighbor lists take unwrapped positions).

The model is any engine student: forward(graph, compute_forces=True) -> {"energy": [B], "forces": [N, 3]}.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from ase import units

from engine.errors import HessforgeError
from engine.graph import AtomicGraph, edge_vectors, graph_from_atoms, graph_to
from engine.models import for_inference
from engine.runner import rebuild_neighbors, resolve_device

ACCEL = units.fs ** 2  # Å/fs² per eV/(Å·amu)
KB = units.kB  # eV/K
INTEGRATORS = ("verlet", "langevin")


class BatchedMD:
    """Integrate `atoms_list` (B systems) with `model`; see the module docstring.

    Initial velocities, per system: drawn at `init_temperature_K` when it is given; else the system's own
    momenta (a restart continues); else, for a system without momenta, drawn at `temperature_K` (zero when
    that is None). temperature_K: Langevin target (scalar or one per system; finite, >= 0 K). seed: the
    random stream (velocities, Langevin noise).

    Reported temperatures count 3N degrees of freedom per system, or 3N - 3 under Verlet for a system that
    starts with zero total momentum (drawn velocities have their centre-of-mass motion removed, and Verlet
    keeps it zero), so a Verlet run drawn at T reads T, as in LAMMPS.
    """

    def __init__(self, model, atoms_list: Sequence, timestep_fs: float, integrator: str = "verlet",
                 temperature_K: Union[float, Sequence[float], None] = None, friction_per_fs: float = 0.01,
                 skin: float = 0.0, init_temperature_K: Optional[float] = None, device=None,
                 dtype: Optional[torch.dtype] = None, seed: Optional[int] = None, neighbor_backend: str = "auto"):
        if integrator not in INTEGRATORS:
            raise HessforgeError(f"integrator must be one of {', '.join(INTEGRATORS)}, got {integrator!r}")
        if not (timestep_fs > 0 and math.isfinite(timestep_fs)):
            raise HessforgeError(f"timestep must be a positive number of fs, got {timestep_fs}")
        if skin < 0:
            raise HessforgeError(f"skin must be >= 0 Å, got {skin}")
        if len(atoms_list) == 0:
            raise HessforgeError("empty batch: no systems to integrate")
        if integrator == "langevin":
            if temperature_K is None:
                raise HessforgeError("langevin needs a target temperature (temperature_K)")
            if not friction_per_fs > 0:
                raise HessforgeError(f"langevin friction must be > 0 (1/fs), got {friction_per_fs}")
        self.device = resolve_device(device)
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        self.dtype = dtype or (params[0].dtype if params else torch.float64)
        model = for_inference(model, self.device, self.dtype)
        self.model = model
        self.cutoff = float(model.cutoff)
        for a in atoms_list:
            model.check_species(a.numbers, a.get_chemical_formula())
        self.fuses_neighbors = bool(getattr(model, "fuses_neighbors", False))
        self.integrator, self.dt, self.skin = integrator, float(timestep_fs), float(skin)
        self.friction = float(friction_per_fs)
        self.neighbor_backend = neighbor_backend
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.nsystems = len(atoms_list)

        # static description of the batch (positions live in self.positions); NaN / zero-volume checks here
        graph = graph_from_atoms(list(atoms_list), self.cutoff, dtype=torch.float64)
        self._graph = graph_to(graph, self.device, self.dtype)
        self.positions = self._graph.positions.clone()
        self.masses = torch.as_tensor(np.concatenate([a.get_masses() for a in atoms_list]),
                                      dtype=self.dtype, device=self.device)
        self.batch = self._graph.batch
        self.natoms = torch.bincount(self.batch, minlength=self.nsystems)
        temps = None if temperature_K is None else self._per_system(temperature_K, "temperature_K")
        self.temperature_K = temps

        if init_temperature_K is not None:
            self.set_velocities(self._per_system(init_temperature_K, "init_temperature_K"))
        else:  # each system its own momenta; one without momenta is drawn at temperature_K
            momenta = np.concatenate([a.get_momenta() for a in atoms_list])  # amu·Å/ASE-time
            v = momenta / np.concatenate([a.get_masses() for a in atoms_list])[:, None] * units.fs  # Å/fs
            given = torch.as_tensor(v, dtype=self.dtype, device=self.device)
            has = torch.tensor([bool(a.get_momenta().any()) for a in atoms_list], device=self.device)
            if temps is not None and not bool(has.all()):
                self.set_velocities(temps)
                given = torch.where(has[self.batch][:, None], given, self.velocities)
            self.velocities = given
            self._find_frozen_centres()
        self._ref_positions = None  # positions at the last neighbor-list build (skin > 0)
        self.nsteps = 0
        self.neighbor_builds = 0
        self.energy, self.forces = self._evaluate(self.positions)

    # ---------------------------------------------------------------------------------- state
    def _per_system(self, value, name: str) -> torch.Tensor:
        """[B] temperatures from a scalar or one value per system: finite and >= 0 K, else HessforgeError."""
        try:
            t = torch.as_tensor(value, dtype=self.dtype).to(self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise HessforgeError(f"{name} must be a number of K or one per system: {err}") from None
        if t.dim() == 0:
            t = t.expand(self.nsystems).clone()
        if t.shape != (self.nsystems,) or not bool((torch.isfinite(t) & (t >= 0)).all()):
            raise HessforgeError(f"{name} must be finite and >= 0 K, a scalar or one per system "
                                 f"({self.nsystems}), got {value}")
        return t

    def _per_system_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[B, ...] sums over each system's atoms of per-atom values [N, ...]."""
        out = torch.zeros((self.nsystems, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add(0, self.batch, values)

    def _find_frozen_centres(self) -> None:
        """Which systems' centre-of-mass degrees of freedom are frozen: zero total momentum (relative to the
        atoms' momenta), which Verlet conserves; the Langevin thermostat moves every atom."""
        p = self._per_system_sum(self.velocities * self.masses[:, None])
        scale = self._per_system_sum(self.masses * self.velocities.norm(dim=1))
        self._com_frozen = (p.norm(dim=1) <= 1e-6 * scale) & (self.natoms > 1) & (self.integrator == "verlet")

    def set_velocities(self, temperature_K, zero_momentum: bool = True) -> None:
        """Maxwell-Boltzmann velocities at `temperature_K` (scalar or per system), with the centre-of-mass
        momentum of each system removed (which takes 3 of its 3N degrees of freedom)."""
        t = self._per_system(temperature_K, "temperature")
        kT = (KB * t)[self.batch]
        sigma = torch.sqrt(kT / self.masses) * units.fs  # Å/fs
        noise = torch.randn(self.positions.shape, generator=self.generator, dtype=self.dtype, device=self.device)
        v = noise * sigma[:, None]
        if zero_momentum:
            p, mtot = self._per_system_sum(v * self.masses[:, None]), self._per_system_sum(self.masses)
            v = v - (p / mtot[:, None])[self.batch]
        self.velocities = v
        self._find_frozen_centres()

    def kinetic_energy(self) -> torch.Tensor:
        """[B] eV."""
        ke = 0.5 * self.masses * self.velocities.square().sum(dim=1) / ACCEL
        return self._per_system_sum(ke)

    def temperature(self) -> torch.Tensor:
        """[B] K over 3N degrees of freedom per system, 3N - 3 where the centre of mass is frozen (class
        docstring)."""
        dof = 3.0 * self.natoms.to(self.dtype) - 3.0 * self._com_frozen.to(self.dtype)
        return 2.0 * self.kinetic_energy() / (dof * KB)

    def potential_energy(self) -> torch.Tensor:
        return self.energy

    def total_energy(self) -> torch.Tensor:
        return self.energy + self.kinetic_energy()

    def to_atoms(self, atoms_list: Sequence) -> List:
        """Copies of `atoms_list` with the current positions and momenta, and the model's results under keys
        of their own (info md_step, md_system, md_potential_energy in eV; arrays md_forces in eV/Å), which do
        not collide with labels the input carries."""
        out = []
        pos = self.positions.detach().double().cpu().numpy()
        vel = self.velocities.detach().double().cpu().numpy() / units.fs  # Å/ASE-time
        energy = self.energy.detach().double().cpu().numpy()
        forces = self.forces.detach().double().cpu().numpy()
        start = 0
        for k, a in enumerate(atoms_list):
            b = a.copy()
            n = len(b)
            b.set_positions(pos[start:start + n])
            b.set_momenta(vel[start:start + n] * b.get_masses()[:, None])
            b.info.update(md_step=self.nsteps, md_system=k, md_potential_energy=float(energy[k]))
            b.arrays["md_forces"] = forces[start:start + n].copy()
            out.append(b)
            start += n
        return out

    # ---------------------------------------------------------------------------------- forces
    def _graph_at(self, positions: torch.Tensor) -> AtomicGraph:
        graph = self._graph._replace(positions=positions)
        if self.fuses_neighbors:
            return graph
        if self.skin == 0:
            self.neighbor_builds += 1
            return rebuild_neighbors(graph, self.cutoff, self.neighbor_backend)
        if self._ref_positions is None or bool(
                ((positions - self._ref_positions).square().sum(dim=1).max() > (0.5 * self.skin) ** 2)):
            self._graph = rebuild_neighbors(graph, self.cutoff + self.skin, self.neighbor_backend)
            self._ref_positions = positions.detach().clone()
            self.neighbor_builds += 1
        graph = self._graph._replace(positions=positions)
        keep = edge_vectors(graph).square().sum(dim=1) < self.cutoff ** 2
        return graph._replace(edge_index=graph.edge_index[:, keep], shifts=graph.shifts[keep])

    def _evaluate(self, positions: torch.Tensor):
        out = self.model(self._graph_at(positions.detach()), compute_forces=True)
        energy, forces = out["energy"].detach().to(self.dtype), out["forces"].detach().to(self.dtype)
        if not bool(torch.isfinite(forces).all()):
            raise HessforgeError(f"non-finite forces at step {self.nsteps}: the model or the dynamics blew up")
        return energy, forces

    # ---------------------------------------------------------------------------------- integration
    def step(self, n: int = 1, callback: Optional[Callable[["BatchedMD"], None]] = None,
             interval: int = 1) -> None:
        """`n` steps; `callback(self)` every `interval` steps."""
        dt = self.dt
        inv_m = (ACCEL / self.masses)[:, None]
        if self.integrator == "langevin":
            c1 = math.exp(-self.friction * dt)
            kT = (KB * self.temperature_K)[self.batch]
            noise_scale = (torch.sqrt((1.0 - c1 * c1) * kT / self.masses) * units.fs)[:, None]
        for _ in range(n):
            v = self.velocities + 0.5 * dt * self.forces * inv_m
            if self.integrator == "verlet":
                x = self.positions + dt * v
            else:
                x = self.positions + 0.5 * dt * v
                xi = torch.randn(v.shape, generator=self.generator, dtype=self.dtype, device=self.device)
                v = c1 * v + noise_scale * xi
                x = x + 0.5 * dt * v
            self.positions = x
            self.energy, self.forces = self._evaluate(x)
            self.velocities = v + 0.5 * dt * self.forces * inv_m
            self.nsteps += 1
            if callback is not None and self.nsteps % interval == 0:
                callback(self)

    run = step
