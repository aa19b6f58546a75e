"""hessforge training: datasets, teachers, Hessian labels, losses, trainer and evaluation."""
