"""Teacher adapters. Each one implements `training.teachers.base.Teacher`."""
from training.teachers.base import Teacher, TeacherOutput

__all__ = ["Teacher", "TeacherOutput"]
