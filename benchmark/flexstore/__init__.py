"""FlexStore: allocation round trips and attach times."""
