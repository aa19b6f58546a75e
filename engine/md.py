"""Batched molecular dynamics: B independent systems integrated at once, one model call per step (on a CPU
one per group of systems of at most 1024 atoms, which bounds memory: `max_atoms_per_call`).

Units: positions Å, velocities Å/fs, masses amu, energies eV, forces eV/Å, time fs, temperature K.
Acceleration a = F/m × ase.units.fs² (Å/fs² per eV/(Å·amu)); kinetic energy = ½ m v² / ase.units.fs².

Integrators (one force evaluation per step):
- "verlet": velocity Verlet (NVE).
- "langevin": BAOAB splitting (Leimkuhler & Matthews): half kick, half drift, exact Ornstein-Uhlenbeck
  velocity update v <- c1 v + sqrt((1 - c1²) kT/m) ξ with c1 = exp(-γ dt), half drift, new forces, half kick.
  Friction γ in 1/fs; every atom thermostatted, each system to its own target temperature.
Constraints: ASE's FixAtoms holds atoms in place (no kick, drift or thermostat noise; 3 degrees of freedom fewer
each in the temperature, as ASE counts them; not under a barostat); any other constraint is refused.

Pressure (optional, `pressure_GPa`): a barostat, each system to its own target pressure. After a step the
instantaneous pressure tensor P = (Σ m v⊗v - dE/dε) / V (virial from the strain derivative, engine.stress, plus
the ideal-gas term: minus ASE's stress with include_ideal_gas) gives each system a deformation M (a symmetric
3x3 matrix: no rotation); the next step starts by mapping that system's positions r -> M r and cell vectors
a -> M a (fractional coordinates kept) and then kicks with the forces of the undeformed geometry (as LAMMPS:
one model call per step). Couplings (`barostat_coupling`):
- "iso": P = tr(P)/3 drives one μ, M = μ 1 (the shape is kept);
- "aniso": each diagonal component P_aa drives its own μ_a, M = diag(μ) (x, y and z relax to their targets
  independently, as LAMMPS' aniso for orthorhombic boxes; a tilted cell's vectors are scaled component by
  component, the diagonal strain that P_aa drives);
- "tri": the full cell, the 6 components of a symmetric strain, M = exp(ε) with ε_ab driven by P_ab - P0_ab
  (targets: a pressure, one per axis, or a full symmetric tensor: shear stress σ_xy = -P0_xy, controlled as
  Cauchy stress, as LAMMPS' xy/xz/yz keywords do), so the shear strains relax and fluctuate too (LAMMPS' tri; the
  elastic constants C44 from the shear fluctuations). For solids: a liquid has no restoring force on its shape,
  and its cell wanders without bound, as under any flexible-cell barostat.
Reported energies, forces and pressures belong to the positions and cell they are reported with. Methods
(`barostat_method`), written for ε the strain increment of a step (iso/aniso: ε_aa = ln μ_a):
- "berendsen" (LAMMPS' fix press/berendsen): exp(3 ε) = 1 - (dt/τ_P)(P0 - P)/B with P the iso or axis pressure
  (μ = [1 - (dt/τ_P)(P0 - P)/B]^(1/3)); tri: the same function of the symmetric matrix (dt/τ_P)(P - P0)/B.
  Velocities are not scaled. Right mean pressure, but it suppresses the volume fluctuations of the NPT ensemble.
- "c-rescale" (stochastic cell rescaling, Bernetti & Bussi, J. Chem. Phys. 153, 114107 (2020); GROMACS'
  C-rescale; its full-cell form after Del Tatto, Raiteri, Bernetti & Bussi, Appl. Sci. 12, 1139 (2022)):
  Berendsen's first-order relaxation plus a noise term, which samples the isothermal-isobaric ensemble (volume
  fluctuations <δV²> = kT V / B_real). Per step, in ln V (iso): 3 ε = -(dt/(τ_P B))(P0 - P) +
  sqrt(2 kT dt/(τ_P B V)) ξ; aniso: per axis ε_aa = -(dt/(3 τ_P B))(P0_a - P_aa) + sqrt(2 kT dt/(3 τ_P B V)) ξ_a;
  tri: the aniso diagonal, and off the diagonal ε_ab = -(dt/(3 τ_P B))(P0_ab - P_ab) + sqrt(kT dt/(3 τ_P B V)) ξ_ab
  (the symmetric part of a matrix of independent noises: the shear strains get the stationary variance
  kT/(4 V C44) of a cubic crystal). ξ standard normal, kT of the Langevin target temperature (the method needs
  integrator "langevin"). Velocities are mapped by M^-1 (momenta inversely to positions, as in the paper). The
  ideal-gas check: N free atoms sample V^N exp(-P0 V/kT), mean (N+1) kT/P0 (tests/test_md.py).
B is the bulk modulus the coupling assumes (1/B: the compressibility of GROMACS' C-rescale): a B above the real
one only slows the approach (relaxation time τ_P B/B_real), one below it overshoots (Berendsen), so the default
(100 GPa, a stiff solid) is safe for liquids and soft solids; neither B nor τ_P changes what c-rescale samples.
Needs gradient-force students (stress): eager, compiled (engine.compiled.CompiledStudent) or fused
(engine.runner.FusedStudent, CompiledFusedStudent: the fused op's backward gives the cell gradient too; not
CUDA-graph replays) or exported (engine.exported: the TorchScript module's batched virial), and systems
periodic in all 3 directions.

Neighbor list: with skin = 0 (default) it is rebuilt from the positions on every step. With skin > 0 a list
to cutoff + skin is built and reused (Verlet list): each step keeps only its pairs within the cutoff, so
the model sees exactly the graph a fresh list would give, and the list is rebuilt when any atom of the
batch has moved more than skin/2 since the last build (under a barostat: moved relative to the scaled
positions, with the skin shrunk by the strongest compression since the build). Models that build their own
neighbor list (engine.runner.FusedStudent) are called on the positions alone. Positions are not wrapped into
the cell (the neighbor lists take unwrapped positions); the state is float64, and a float32 model gets each
system translated near the origin and wrapped into its cell first (engine.graph.recentred: no edge vector
changes), so its precision does not decay as atoms move away from the origin.

The model is any engine student: forward(graph, compute_forces=True) -> {"energy": [B], "forces": [N, 3]}.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase import units

from engine.allocator import keep_freed_memory
from engine.errors import HessforgeError
from engine.graph import (AtomicGraph, atoms_per_call, edge_vectors, graph_from_atoms, graph_to, recentred,
                          split_batch, structure_chunks)
from engine.models import Student, for_inference, working_dtype
from engine.neighbors import lattice_cells
from engine.runner import CompiledFusedStudent, FusedStudent, rebuild_neighbors, resolve_device
from engine.stress import cell_volumes, energy_forces_strain_derivative

ACCEL = units.fs ** 2  # Å/fs² per eV/(Å·amu)
KB = units.kB  # eV/K
INTEGRATORS = ("verlet", "langevin")
BAROSTAT_COUPLINGS = ("iso", "aniso", "tri")
BAROSTAT_METHODS = ("berendsen", "c-rescale")


class BatchedMD:
    """Integrate `atoms_list` (B systems) with `model`; see the module docstring.

    Initial velocities, per system: drawn at `init_temperature_K` when it is given; else the system's own
    momenta (a restart continues); else, for a system without momenta, drawn at `temperature_K` (zero when
    that is None). temperature_K: Langevin target (scalar or one per system; finite, >= 0 K). seed: the
    random stream (velocities, Langevin noise).

    Reported temperatures count 3N degrees of freedom per system, or 3N - 3 under Verlet for a system that
    starts with zero total momentum (drawn velocities have their centre-of-mass motion removed, and Verlet
    keeps it zero), so a Verlet run drawn at T reads T, as in LAMMPS.

    pressure_GPa (scalar or one per system; None: constant volume) turns on the barostat (module docstring);
    under aniso and tri coupling it may also give each axis its own target, [B, 3] or [[px, py, pz]] (GPa;
    e.g. uniaxial stress along z: [[0, 0, 5]]), under tri a full symmetric tensor [B, 3, 3] or [[[...]]]; with
    coupling time barostat_time_fs (τ_P), assumed bulk modulus bulk_modulus_GPa (B), coupling barostat_coupling
    ("iso": the volume, "aniso": each Cartesian axis, "tri": the full cell) and method barostat_method
    ("berendsen", or "c-rescale" for NPT volume fluctuations; it needs "langevin").

    max_atoms_per_call: the systems' forces in one model call (None or 0), or in consecutive groups of whole
    systems of at most this many atoms (a larger system alone). "auto": one call on a GPU, groups of
    engine.graph.CPU_ATOMS_PER_CALL (1024) atoms on a CPU (bench/results/md_cpu_atoms_per_call.md: with large
    blocks kept in the heap, engine/allocator.py, group size hardly changes the speed). Each system's forces are
    the same either way.
    """

    def __init__(self, model, atoms_list: Sequence, timestep_fs: float, integrator: str = "verlet",
                 temperature_K: Union[float, Sequence[float], None] = None, friction_per_fs: float = 0.01,
                 skin: float = 0.0, init_temperature_K: Optional[float] = None, device=None,
                 dtype: Optional[torch.dtype] = None, seed: Optional[int] = None, neighbor_backend: str = "auto",
                 pressure_GPa: Union[float, Sequence[float], None] = None, barostat_time_fs: float = 1000.0,
                 bulk_modulus_GPa: float = 100.0, barostat_coupling: str = "iso",
                 barostat_method: str = "berendsen", max_atoms_per_call: Union[int, str, None] = "auto"):
        keep_freed_memory()  # large tensors reused, not faulted in again every step (engine/allocator.py)
        if integrator not in INTEGRATORS:
            raise HessforgeError(f"integrator must be one of {', '.join(INTEGRATORS)}, got {integrator!r}")
        if not (timestep_fs > 0 and math.isfinite(timestep_fs)):
            raise HessforgeError(f"timestep must be a positive number of fs, got {timestep_fs}")
        if skin < 0:
            raise HessforgeError(f"skin must be >= 0 Å, got {skin}")
        if len(atoms_list) == 0:
            raise HessforgeError("empty batch: no systems to integrate")
        for k, a in enumerate(atoms_list):
            if len(a) == 0:
                raise HessforgeError(f"system {k} has no atoms")
        if integrator == "langevin":
            if temperature_K is None:
                raise HessforgeError("langevin needs a target temperature (temperature_K)")
            if not friction_per_fs > 0:
                raise HessforgeError(f"langevin friction must be > 0 (1/fs), got {friction_per_fs}")
        self.device = resolve_device(device)
        # the model runs in model_dtype; positions, velocities, cells and the integrator are float64 whatever it
        # is (float32 coordinates lose ~1e-4 Å at 2000 Å: long runs, unwrapped diffusion, structures far out)
        self.model_dtype = working_dtype(dtype, model)
        from engine.exported import ExportedModel

        if isinstance(model, ExportedModel):  # takes float64 coordinates whatever its own dtype (the file's)
            self.model_dtype = torch.float64
        self.dtype = torch.float64
        model = for_inference(model, self.device, self.model_dtype)
        self.model = model
        self.cutoff = float(model.cutoff)
        for k, a in enumerate(atoms_list):
            model.check_species(a.numbers, f"system {k} ({a.get_chemical_formula()})")
        self.barostat = pressure_GPa is not None
        if self.barostat:
            self._check_barostat(model, atoms_list, timestep_fs, barostat_time_fs, bulk_modulus_GPa,
                                 barostat_coupling, barostat_method, integrator)
        self.fuses_neighbors = bool(getattr(model, "fuses_neighbors", False))
        self.integrator, self.dt, self.skin = integrator, float(timestep_fs), float(skin)
        self.friction = float(friction_per_fs)
        self.neighbor_backend = neighbor_backend
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.nsystems = len(atoms_list)
        self.max_atoms_per_call = atoms_per_call(max_atoms_per_call, self.device)

        # static description of the batch (positions live in self.positions); NaN / zero-volume checks here
        graph = graph_from_atoms(list(atoms_list), self.cutoff, dtype=torch.float64)
        self._graph = graph_to(graph, self.device, self.dtype)
        self._user_basis = self._user_bases(atoms_list)
        self.positions = self._graph.positions.clone()
        self.masses = torch.as_tensor(np.concatenate([a.get_masses() for a in atoms_list]),
                                      dtype=self.dtype, device=self.device)
        self.batch = self._graph.batch
        self.natoms = torch.bincount(self.batch, minlength=self.nsystems)
        # (structure range, atom range) of each model call
        counts = self.natoms.tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._calls = [((b0, b1), (starts[b0], starts[b1]))
                       for b0, b1 in structure_chunks(counts, self.max_atoms_per_call or sum(counts))]
        self._capacities: Dict[int, int] = {}  # a padded fused student's edge slots, per group
        fixed = torch.as_tensor(_fixed_atoms(atoms_list, self.barostat), device=self.device)
        self.mobile = (~fixed).to(self.dtype)[:, None]  # [N, 1]: 0 where FixAtoms holds an atom in place
        self.nfixed = torch.bincount(self.batch[fixed], minlength=self.nsystems)
        temps = None if temperature_K is None else self._per_system(temperature_K, "temperature_K")
        self.temperature_K = temps
        if self.barostat:
            self.target_pressure = self._pressure_targets(pressure_GPa, barostat_coupling) * units.GPa  # [B, 3, 3] eV/Å³
            self.barostat_time, self.bulk_modulus = float(barostat_time_fs), float(bulk_modulus_GPa) * units.GPa
            self.barostat_coupling, self.barostat_method = barostat_coupling, barostat_method
        self._pending_deformation = None  # [B, 3, 3] M per system, applied at the start of the next step
        # a lower bound on the smallest stretch (singular value) of the deformations since the last list build
        self._stretch_since_build = torch.ones(self.nsystems, dtype=self.dtype, device=self.device)
        self.dE_deps = None  # [B, 3, 3] eV under a barostat: the strain derivative at the current geometry

        if init_temperature_K is not None:
            self.set_velocities(self._per_system(init_temperature_K, "init_temperature_K"))
        else:  # each system its own momenta; one without momenta is drawn at temperature_K
            for k, a in enumerate(atoms_list):
                if not np.isfinite(a.get_momenta()).all():
                    raise HessforgeError(f"system {k} ({a.get_chemical_formula()}): its momenta hold NaN or Inf")
            momenta = np.concatenate([a.get_momenta() for a in atoms_list])  # amu·Å/ASE-time
            v = momenta / np.concatenate([a.get_masses() for a in atoms_list])[:, None] * units.fs  # Å/fs
            given = torch.as_tensor(v, dtype=self.dtype, device=self.device)
            has = torch.tensor([bool(a.get_momenta().any()) for a in atoms_list], device=self.device)
            if temps is not None and not bool(has.all()):
                self.set_velocities(temps)
                given = torch.where(has[self.batch][:, None], given, self.velocities)
            self.velocities = given * self.mobile
            self._find_frozen_centres()
        self._ref_positions = None  # positions at the last neighbor-list build (skin > 0)
        self.nsteps = 0
        self.step_offset = 0  # added to md_step in written frames: a run continued from a file numbers on
        self.neighbor_builds = 0
        self.energy, self.forces = self._evaluate(self.positions)
        if self.barostat:
            self._pending_deformation = self._barostat_deformation()

    # ---------------------------------------------------------------------------------- state
    def _per_system(self, value, name: str, unit: str = "K", allow_negative: bool = False) -> torch.Tensor:
        """[B] values (temperatures, pressures) from a scalar or one per system: finite (and >= 0 unless
        allow_negative), else HessforgeError."""
        try:
            t = torch.as_tensor(value, dtype=self.dtype).to(self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise HessforgeError(f"{name} must be a number of {unit} or one per system: {err}") from None
        if t.dim() == 0:
            t = t.expand(self.nsystems).clone()
        if t.shape != (self.nsystems,) or not bool((torch.isfinite(t) & (allow_negative | (t >= 0))).all()):
            raise HessforgeError(f"{name} must be finite{'' if allow_negative else f' and >= 0 {unit}'}, a scalar "
                                 f"or one per system ({self.nsystems}), got {value}")
        return t

    def _pressure_targets(self, value, coupling: str) -> torch.Tensor:
        """[B, 3, 3] target pressure tensors (GPa; P = -stress): a scalar or one per system (hydrostatic); under
        aniso or tri coupling per axis, [B, 3] (one row per system) or [[px, py, pz]] (the same for all); under
        tri also full symmetric tensors, [B, 3, 3] or [[[pxx, pxy, pxz], ...]] (shear targets)."""
        ndim = np.ndim(np.asarray(value, dtype=object))
        if ndim not in (2, 3):
            hydrostatic = self._per_system(value, "pressure_GPa", unit="GPa", allow_negative=True)
            return torch.diag_embed(hydrostatic[:, None].expand(-1, 3)).clone()
        what = "per-axis" if ndim == 2 else "tensor"
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=self.dtype).to(self.device)
        except (TypeError, ValueError) as err:
            raise HessforgeError(f"{what} pressure_GPa must be numbers of GPa: {err}") from None
        if t.shape[0] == 1:
            t = t.expand(self.nsystems, *t.shape[1:])
        shape = (self.nsystems, 3) if ndim == 2 else (self.nsystems, 3, 3)
        if t.shape != shape or not bool(torch.isfinite(t).all()):
            raise HessforgeError(f"{what} pressure_GPa must be finite, [systems ({self.nsystems}), "
                                 f"{', '.join(map(str, shape[1:]))}] or [1, {', '.join(map(str, shape[1:]))}], "
                                 f"got shape {tuple(t.shape)}")
        t = torch.diag_embed(t) if ndim == 2 else t.clone()
        if not bool((t == t.transpose(1, 2)).all()):
            raise HessforgeError("tensor pressure_GPa must be symmetric (P_ab = P_ba: no torque on the cell)")
        diagonal = torch.diagonal(t, dim1=1, dim2=2)
        if coupling == "iso" and not bool((diagonal == diagonal[:, :1]).all()):
            raise HessforgeError("different target pressures per axis need barostat_coupling='aniso' or 'tri'")
        if coupling != "tri" and bool((t != torch.diag_embed(diagonal)).any()):
            raise HessforgeError("shear targets (off-diagonal pressure_GPa) need barostat_coupling='tri'")
        return t

    def _check_barostat(self, model, atoms_list, timestep_fs, barostat_time_fs, bulk_modulus_GPa,
                        coupling, method, integrator) -> None:
        from engine.compiled import CompiledStudent

        if coupling not in BAROSTAT_COUPLINGS:
            raise HessforgeError(f"barostat coupling must be one of {', '.join(BAROSTAT_COUPLINGS)}, got {coupling!r}")
        if method not in BAROSTAT_METHODS:
            raise HessforgeError(f"barostat method must be one of {', '.join(BAROSTAT_METHODS)}, got {method!r}")
        if method == "c-rescale" and integrator != "langevin":
            raise HessforgeError("the c-rescale barostat samples constant pressure at the thermostat's temperature: "
                                 f"it needs integrator 'langevin' (with temperature_K), got {integrator!r}")
        # the strain derivative needs the energy as a differentiable function of positions and cell: eager and
        # compiled students, and fused ones (the fused op's backward reaches the cell through the edges' shifts);
        # not CUDA-graph replays, whose static buffers this double use of inputs was never checked on
        # exported models compute it in their own backward pass (engine.exported)
        strain_ready = (isinstance(model, (Student, CompiledStudent, FusedStudent))
                        or (isinstance(model, CompiledFusedStudent) and not model.graphs)
                        or hasattr(model, "energy_forces_strain_derivative"))
        if not strain_ready or model.direct_forces:
            kind = type(model).__name__
            if strain_ready:
                kind += " (direct forces)"
            elif getattr(model, "graphs", False):
                kind += " (CUDA graphs)"
            raise HessforgeError(f"a barostat (pressure) needs the stress of a gradient-force student, eager, "
                                 f"compiled, fused or exported; {kind} gives none here")
        for k, a in enumerate(atoms_list):
            if not a.pbc.all():
                raise HessforgeError(f"a barostat (pressure) needs systems periodic in all 3 directions; system {k} "
                                     f"({a.get_chemical_formula()}) has pbc {a.pbc.tolist()}")
        if not (math.isfinite(barostat_time_fs) and barostat_time_fs >= 10 * timestep_fs):
            raise HessforgeError(f"barostat time must be a number of fs >= 10 time steps ({10 * timestep_fs:g} fs), "
                                 f"got {barostat_time_fs}: Berendsen coupling faster than that is unstable")
        if not (math.isfinite(bulk_modulus_GPa) and bulk_modulus_GPa > 0):
            raise HessforgeError(f"bulk modulus must be a positive number of GPa, got {bulk_modulus_GPa}")

    def _per_system_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[B, ...] sums over each system's atoms of per-atom values [N, ...]."""
        out = torch.zeros((self.nsystems, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add(0, self.batch, values)

    def _find_frozen_centres(self) -> None:
        """Which systems' centre-of-mass degrees of freedom are frozen: zero total momentum (relative to the
        atoms' momenta), which Verlet conserves; the Langevin thermostat moves every atom."""
        p = self._per_system_sum(self.velocities * self.masses[:, None])
        scale = self._per_system_sum(self.masses * self.velocities.norm(dim=1))
        self._com_frozen = ((p.norm(dim=1) <= 1e-6 * scale) & (self.natoms > 1) & (self.integrator == "verlet")
                            & (self.nfixed == 0))  # fixed atoms take up momentum: the centre moves

    def set_velocities(self, temperature_K, zero_momentum: bool = True) -> None:
        """Maxwell-Boltzmann velocities at `temperature_K` (scalar or per system), with the centre-of-mass
        momentum of each system removed (which takes 3 of its 3N degrees of freedom); atoms FixAtoms holds stay
        at rest (and a system with such atoms keeps its drawn momentum: it is anchored), and so does a system of
        one atom (removing its momentum would leave it at rest, at 0 K)."""
        t = self._per_system(temperature_K, "temperature")
        kT = (KB * t)[self.batch]
        sigma = torch.sqrt(kT / self.masses) * units.fs  # Å/fs
        noise = torch.randn(self.positions.shape, generator=self.generator, dtype=self.dtype, device=self.device)
        v = noise * sigma[:, None]
        if zero_momentum:
            p, mtot = self._per_system_sum(v * self.masses[:, None]), self._per_system_sum(self.masses)
            remove = (self.nfixed == 0) & (self.natoms > 1)  # a lone atom keeps its draw (else it is at rest)
            v = v - (p / mtot[:, None] * remove[:, None])[self.batch]
        self.velocities = v * self.mobile
        self._find_frozen_centres()

    def kinetic_energy(self) -> torch.Tensor:
        """[B] eV."""
        ke = 0.5 * self.masses * self.velocities.square().sum(dim=1) / ACCEL
        return self._per_system_sum(ke)

    def temperature(self) -> torch.Tensor:
        """[B] K over 3N degrees of freedom per system, less 3 where the centre of mass is frozen (class
        docstring) and 3 per atom FixAtoms holds (as ASE counts them)."""
        dof = 3.0 * (self.natoms - self.nfixed).to(self.dtype) - 3.0 * self._com_frozen.to(self.dtype)
        return 2.0 * self.kinetic_energy() / (dof.clamp(min=1.0) * KB)  # no free atom: 0 K, not 0/0

    def potential_energy(self) -> torch.Tensor:
        return self.energy

    def total_energy(self) -> torch.Tensor:
        return self.energy + self.kinetic_energy()

    def _user_bases(self, atoms_list) -> Optional[torch.Tensor]:
        """[B, 3, 3] integer matrices U with the caller's cell = U @ the graph's, where build_graph holds a
        skewed thin cell in its reduced basis (engine.neighbors.reduce_thin_cells); None if there is none. A
        barostat deforms cells on the right (cell @ M), so U @ cell stays the caller's basis of the new cell."""
        pbc = self._graph.pbc.cpu()
        cells = torch.as_tensor(np.stack([np.asarray(a.cell, dtype=np.float64) for a in atoms_list]))
        _, ops = lattice_cells(cells, pbc)
        if bool((ops == torch.eye(3, dtype=ops.dtype)).all()):
            return None
        inverse = torch.linalg.inv(ops)  # integer on periodic rows; a slab's vacuum rows come back as given
        inverse = torch.where(pbc.to(torch.bool)[:, :, None], inverse.round(), inverse)
        return inverse.to(device=self.device, dtype=self.dtype)

    def cell(self) -> torch.Tensor:
        """[B, 3, 3] Å, cell vectors as rows (they change under a barostat), in the basis the systems came
        with; a copy."""
        cell = self._graph.cell
        return (cell if self._user_basis is None else self._user_basis @ cell).clone()

    def volume(self) -> torch.Tensor:
        """[B] Å³ (0 for systems without a 3D cell)."""
        return cell_volumes(self._graph.cell)

    def pressure_tensor(self) -> torch.Tensor:
        """[B, 3, 3] instantaneous pressure tensor in eV/Å³, virial plus ideal-gas term (barostat runs only):
        minus ASE's stress with include_ideal_gas."""
        if self.dE_deps is None:
            raise HessforgeError("pressure is computed under a barostat only (pressure_GPa)")
        v = self.velocities
        kinetic = self._per_system_sum(self.masses[:, None, None] * v[:, :, None] * v[:, None, :]) / ACCEL  # eV
        return (kinetic - self.dE_deps) / self.volume()[:, None, None]

    def pressure(self) -> torch.Tensor:
        """[B] instantaneous pressure in eV/Å³, tr(P)/3 of pressure_tensor (barostat runs only)."""
        return torch.diagonal(self.pressure_tensor(), dim1=1, dim2=2).sum(dim=1) / 3.0

    def to_atoms(self, atoms_list: Sequence) -> List:
        """Copies of `atoms_list` with the current positions and momenta, and the model's results under keys
        of their own (info md_step (step_offset + steps run), md_system, md_potential_energy in eV, under a barostat md_pressure_GPa,
        md_pressure_tensor_GPa [3, 3] and the current cell; arrays md_forces in eV/Å), which do not collide with
        labels the input carries."""
        out = []
        pos = self.positions.detach().double().cpu().numpy()
        vel = self.velocities.detach().double().cpu().numpy() / units.fs  # Å/ASE-time
        energy = self.energy.detach().double().cpu().numpy()
        forces = self.forces.detach().double().cpu().numpy()
        if self.barostat:
            tensor = (self.pressure_tensor() / units.GPa).detach().double().cpu().numpy()
        cells = self.cell().detach().double().cpu().numpy()
        start = 0
        for k, a in enumerate(atoms_list):
            b = a.copy()
            n = len(b)
            if self.barostat:
                b.set_cell(cells[k])
                b.info["md_pressure_GPa"] = float(np.trace(tensor[k]) / 3.0)
                b.info["md_pressure_tensor_GPa"] = tensor[k].copy()
            # exactly the integrated state (the atoms' constraints were applied by the integration itself)
            b.set_positions(pos[start:start + n], apply_constraint=False)
            b.set_momenta(vel[start:start + n] * b.get_masses()[:, None], apply_constraint=False)
            b.info.update(md_step=self.step_offset + self.nsteps, md_system=k, md_potential_energy=float(energy[k]))
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
        if self._ref_positions is None or self._list_expired(positions):
            self._graph = rebuild_neighbors(graph, self.cutoff + self.skin, self.neighbor_backend)
            self._ref_positions = positions.detach().clone()
            self._stretch_since_build.fill_(1.0)
            self.neighbor_builds += 1
        graph = self._graph._replace(positions=positions)
        keep = edge_vectors(graph).square().sum(dim=1) < self.cutoff ** 2
        return graph._replace(edge_index=graph.edge_index[:, keep], shifts=graph.shifts[keep])

    def _list_expired(self, positions: torch.Tensor) -> bool:
        """Whether a pair within the cutoff now may be missing from the list built at _ref_positions. Under a
        barostat the reference positions were deformed with the system (by S, the product of the deformations
        since the build), so a pair's vector is S r_build + (d_i - d_j), d the displacement from the deformed
        reference, and |S r_build| >= s |r_build| with s <= the smallest singular value of S: every pair within
        the cutoff was within cutoff + skin at the build while 2 max|d| <= s (cutoff + skin) - cutoff."""
        moved = (positions - self._ref_positions).square().sum(dim=1).max().sqrt()
        budget = float(self._stretch_since_build.min()) * (self.cutoff + self.skin) - self.cutoff
        return not bool(2.0 * moved <= budget)  # NaN: expired (never a stale list kept)

    def _evaluate(self, positions: torch.Tensor, step: Optional[int] = None):
        """Energies and forces at `positions`, those of step `step` (default: the current one)."""
        step = (self.nsteps if step is None else step) + self.step_offset
        finite = torch.isfinite(positions).all(dim=1)
        if not bool(finite.all()):
            k = int(self.batch[int((~finite).nonzero()[0])])
            raise HessforgeError(f"non-finite positions at step {step} in system {k}: the dynamics blew up "
                                 "(time step too long, or a model without repulsion at short range)")
        graph = self._graph_at(positions.detach())
        if self.model_dtype != torch.float64:  # small coordinates before the cast: every edge vector unchanged
            graph = graph_to(recentred(graph), self.device, self.model_dtype)
        if len(self._calls) == 1:
            energy, forces, dE_deps = self._call(graph)
        else:
            parts = [self._call(sub, group) for group, sub in enumerate(split_batch(graph, self._calls))]
            energy, forces = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            dE_deps = torch.cat([p[2] for p in parts]) if self.barostat else None
        if self.barostat:
            self.dE_deps = dE_deps
        if not bool(torch.isfinite(forces).all()):
            raise HessforgeError(f"non-finite forces at step {step}: the model or the dynamics blew up")
        return energy, forces

    def _call(self, graph: AtomicGraph, group: int = 0):
        """(energy [B], forces [N, 3], dE/dε [B, 3, 3] under a barostat else None) of one model call, float64.
        A padded fused student keeps one edge capacity per group (a shared one would shrink on a small group
        and overflow, and be redone, on the next large one: a new CUDA graph each time under cudagraphs)."""
        fused = getattr(self.model, "fused", self.model)
        padded = len(self._calls) > 1 and getattr(fused, "capacity", None) is not None
        if padded:
            fused.capacity = self._capacities.get(group, 0)  # 0: sized from an exact count at the first call
        try:
            return self._model_call(graph)
        finally:
            if padded:
                self._capacities[group] = fused.capacity

    def _model_call(self, graph: AtomicGraph):
        if self.barostat:
            out = energy_forces_strain_derivative(self.model, graph)
            dE_deps = out["dE_deps"].detach().to(self.dtype)
        else:
            out = self.model(graph, compute_forces=True)
            dE_deps = None
        return out["energy"].detach().to(self.dtype), out["forces"].detach().to(self.dtype), dE_deps

    # ---------------------------------------------------------------------------------- integration
    def step(self, n: int = 1, callback: Optional[Callable[["BatchedMD"], None]] = None,
             interval: int = 1) -> None:
        """`n` steps; `callback(self)` every `interval` steps."""
        dt = self.dt
        inv_m = (ACCEL / self.masses)[:, None] * self.mobile  # fixed atoms: no kick, no drift, no noise
        if self.integrator == "langevin":
            c1 = math.exp(-self.friction * dt)
            kT = (KB * self.temperature_K)[self.batch]
            noise_scale = (torch.sqrt((1.0 - c1 * c1) * kT / self.masses) * units.fs)[:, None] * self.mobile
        for _ in range(n):
            if self.barostat:
                self._scale_systems()
            v = self.velocities + 0.5 * dt * self.forces * inv_m
            if self.integrator == "verlet":
                x = self.positions + dt * v
            else:
                x = self.positions + 0.5 * dt * v
                xi = torch.randn(v.shape, generator=self.generator, dtype=self.dtype, device=self.device)
                v = c1 * v + noise_scale * xi
                x = x + 0.5 * dt * v
            self.positions = x
            self.energy, self.forces = self._evaluate(x, self.nsteps + 1)
            self.velocities = v + 0.5 * dt * self.forces * inv_m
            self.nsteps += 1
            if self.barostat:
                self._pending_deformation = self._barostat_deformation()
            if callback is not None and self.nsteps % interval == 0:
                callback(self)

    run = step

    # ---------------------------------------------------------------------------------- barostat
    def _barostat_deformation(self) -> torch.Tensor:
        """[B, 3, 3] symmetric deformation M per system from the pressure now (module docstring)."""
        tensor = self.pressure_tensor()
        diagonal = torch.diagonal(tensor, dim1=1, dim2=2)  # [B, 3]
        coupling = self.barostat_coupling
        if coupling == "tri":  # the full tensors
            pressure, target = tensor, self.target_pressure
        else:
            pressure = diagonal.mean(dim=1, keepdim=True).expand(-1, 3) if coupling == "iso" else diagonal
            target = torch.diagonal(self.target_pressure, dim1=1, dim2=2)
        # Berendsen's relative volume change: the drift of 3 ε (iso: ln V; per axis: 3 ln L_a)
        drift = -self.dt / self.barostat_time * (target - pressure) / self.bulk_modulus
        volume_ratio = 1.0 + drift if self.barostat_method == "berendsen" else torch.exp(drift)
        self._check_volume_ratio(volume_ratio, pressure, target)
        if self.barostat_method == "berendsen":
            if coupling == "tri":  # (1 + drift)^(1/3) of the symmetric matrix
                eye = torch.eye(3, dtype=self.dtype, device=self.device)
                return _symmetric_function(eye + drift, lambda x: x.pow(1.0 / 3.0))
            return torch.diag_embed(volume_ratio.pow(1.0 / 3.0))
        # c-rescale noise: variance 2 kT dt / (τ_P B V) for ln V, a third of it per axis (aniso, tri), a sixth
        # per shear strain (tri: the symmetric part of independent noises)
        kT = KB * self.temperature_K
        variance = 2.0 * kT * self.dt / (self.barostat_time * self.bulk_modulus * self.volume())  # [B]
        if coupling == "iso":
            xi = torch.randn(self.nsystems, 1, generator=self.generator, dtype=self.dtype, device=self.device)
            strain = (drift + variance.sqrt()[:, None] * xi) / 3.0  # the same for every axis
            return torch.diag_embed(torch.exp(strain))
        shape = (self.nsystems, 3) if coupling == "aniso" else (self.nsystems, 3, 3)
        xi = torch.randn(shape, generator=self.generator, dtype=self.dtype, device=self.device)
        if coupling == "aniso":
            strain = drift / 3.0 + (variance / 3.0).sqrt()[:, None] * xi  # ln L_a
            return torch.diag_embed(torch.exp(strain))
        noise = 0.5 * (xi + xi.transpose(1, 2)) * (variance / 3.0).sqrt()[:, None, None]
        return _symmetric_function(drift / 3.0 + noise, torch.exp)

    def _check_volume_ratio(self, volume_ratio: torch.Tensor, pressure: torch.Tensor, target: torch.Tensor) -> None:
        """A step that would change a volume (or a shear) by more than 10 %: clear error."""
        bad = ~((volume_ratio > 0.9) & (volume_ratio < 1.1))  # also NaN
        if not bool(bad.any()):
            return
        index = tuple(int(i) for i in bad.nonzero()[0])  # (system,), (system, axis) or (system, row, column)
        k, component = index[0], "".join("xyz"[c] for c in index[1:])
        if self.barostat_coupling == "iso":
            what = "its volume"
        elif len(component) == 1 or component[0] == component[1]:
            what = f"its volume (through axis {component[0]})"
        else:
            what = f"its shape (through shear {component})"
        raise HessforgeError(
            f"barostat at step {self.nsteps}: system {k} would change {what} by a factor "
            f"{float(volume_ratio[index]):.3g} in one step (pressure {float(pressure[index] / units.GPa):.4g} "
            f"GPa, target {float(target[index] / units.GPa):.4g}): the dynamics blew up, or the "
            "coupling is too strong (raise the barostat time or the bulk modulus)")

    def _scale_systems(self) -> None:
        """Apply the pending deformation M [B, 3, 3] (symmetric) to the positions (unwrapped, so every periodic
        image moves consistently) and cell vectors of each system, and to the neighbor list's reference
        positions with them (fractional coordinates are kept); under c-rescale the velocities go by M^-1."""
        if self._pending_deformation is None:
            return
        m = self._pending_deformation
        self._pending_deformation = None
        per_atom = m[self.batch]
        self.positions = torch.einsum("nab,nb->na", per_atom, self.positions)
        if self.barostat_method == "c-rescale":  # momenta transform inversely to positions
            self.velocities = torch.einsum("nab,nb->na", torch.linalg.inv(m)[self.batch], self.velocities)
        self._graph = self._graph._replace(cell=self._graph.cell @ m)  # rows a -> M a; M = M^T
        if self._ref_positions is not None:
            self._ref_positions = torch.einsum("nab,nb->na", per_atom, self._ref_positions)
            self._stretch_since_build = self._stretch_since_build * torch.linalg.eigvalsh(m)[:, 0]


def _fixed_atoms(atoms_list: Sequence, barostat: bool) -> np.ndarray:
    """[N] bool: the atoms FixAtoms constraints hold in place (a slab's bottom layers); any other ASE constraint
    is refused rather than ignored, as are fixed atoms under a barostat (the cell would move them)."""
    from ase.constraints import FixAtoms

    masks = []
    for k, a in enumerate(atoms_list):
        mask = np.zeros(len(a), dtype=bool)
        for c in a.constraints:
            where = f"system {k} ({a.get_chemical_formula()})"
            if not isinstance(c, FixAtoms):
                raise HessforgeError(f"{where}: constraint {type(c).__name__} is not supported by batched MD (FixAtoms "
                                     "is); run it under ASE's dynamics with engine.Calculator, or remove it")
            mask[c.get_indices()] = True
        if barostat and mask.any():
            raise HessforgeError(f"system {k} ({a.get_chemical_formula()}): fixed atoms (FixAtoms) under a "
                                 "barostat are not supported: rescaling the cell would move them")
        masks.append(mask)
    return np.concatenate(masks)


def _symmetric_function(matrix: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to the eigenvalues of symmetric matrices [B, 3, 3] (exp, a power): U fn(λ) U^T."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag_embed(fn(values)) @ vectors.transpose(1, 2)
