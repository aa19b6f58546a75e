"""Student architectures, one file each, sharing one interface: forward(graph) -> energy, forces, features."""
from engine.models.painn import PaiNN

STUDENTS = {"painn": PaiNN}


def build_student(name: str, **kwargs):
    from engine.errors import HessforgeError

    if name.lower() not in STUDENTS:
        raise HessforgeError(f"unknown student architecture {name!r}; available: {', '.join(STUDENTS)}")
    return STUDENTS[name.lower()](**kwargs)


__all__ = ["PaiNN", "STUDENTS", "build_student"]
