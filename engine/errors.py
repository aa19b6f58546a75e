"""User-facing errors: one clear message naming the problem (and the file, where there is one)."""


class HessforgeError(Exception):
    """An error caused by the user's input. The CLI prints its message alone, without a traceback."""


class UnknownElementError(HessforgeError):
    def __init__(self, elements, known, where: str = ""):
        from ase.data import chemical_symbols

        def symbol(z: int) -> str:  # no element beyond 118 (or below 1): a corrupt input, still named
            return chemical_symbols[z] if 0 < z < len(chemical_symbols) else "no element"

        names = ", ".join(f"{symbol(z)} (Z={z})" for z in sorted(set(int(e) for e in elements)))
        ok = ", ".join(symbol(z) for z in sorted(known))
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}unknown element(s) {names}; supported: {ok}")
