"""Student architectures, one file each, on one base (engine.models.base.Student) and one interface:
forward(graph) -> energy, forces, features."""
from engine.models.base import Student
from engine.models.painn import PaiNN
from engine.models.schnet import SchNet

STUDENTS = {"painn": PaiNN, "schnet": SchNet}


def student_class(name, where: str = "student") -> type:
    """The architecture called `name` (case-insensitive); an unknown name is one clear error naming `where`."""
    from engine.errors import HessforgeError

    cls = STUDENTS.get(str(name).lower())
    if cls is None:
        raise HessforgeError(f"{where}: unknown student architecture {name!r}; available: {', '.join(STUDENTS)}")
    return cls


def build_student(name: str, **kwargs):
    return student_class(name)(**kwargs)


def parse_dtype(dtype):
    """An inference dtype setting: "float32", "float64", torch.float32/float64, or None (the model's own)."""
    import torch

    from engine.errors import HessforgeError

    choices = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str):
        if dtype not in choices:
            raise HessforgeError(f"dtype must be one of {', '.join(choices)}, got {dtype!r}")
        return choices[dtype]
    if dtype is not None and dtype not in choices.values():
        raise HessforgeError(f"dtype must be one of {', '.join(choices)}, got {dtype}")
    return dtype


def working_dtype(dtype, model):
    """parse_dtype(dtype), where None takes the model's parameters' dtype (float64 for a model without
    parameters), refused unless float32 or float64 (a half-precision model: pass a dtype)."""
    import torch

    from engine.errors import HessforgeError

    dtype = parse_dtype(dtype)
    if dtype is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        dtype = params[0].dtype if params else torch.float64
        if dtype not in (torch.float32, torch.float64):
            raise HessforgeError(f"the model's dtype {dtype} is not supported; pass dtype='float32' or 'float64'")
    return dtype


def for_inference(model, device, dtype):
    """`model` on `device` in `dtype`, in eval mode with frozen parameters, for an inference tool (ASE
    calculator, batched MD, bench target). A student architecture is copied first, so the caller's model
    (one still being trained, or shared with another tool in another dtype) is left as it was; a wrapper
    (compiled or fused student, whose compiled code is bound to the model inside it) is converted in place."""
    import copy

    import torch

    if not isinstance(model, torch.nn.Module):
        return model
    # outside inference_mode even when called in it: copies made there could not serve the forces' autograd
    with torch.inference_mode(False):
        if isinstance(model, Student):  # always: even a ready model may be edited by its owner
            model = copy.deepcopy(model)
        model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["PaiNN", "SchNet", "Student", "STUDENTS", "build_student", "for_inference", "parse_dtype", "student_class",
           "working_dtype"]
