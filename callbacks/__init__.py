"""Schedules and safeguards as Lightning callbacks (installed as ``lit_robust.callbacks``).

The FOSC, early-stopping, EMA and attack-strength callbacks arrive with issue 4; the
package exists now so the install layout is fixed and tested from the start.
"""

__all__: list[str] = []
