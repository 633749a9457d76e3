"""The application firewall: SecLang rules (OWASP CRS) compiled to an evaluation plan."""
