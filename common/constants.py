"""Physical constants (CODATA 2018 exact values)."""

E_CHARGE = 1.602176634e-19          # elementary charge, C
