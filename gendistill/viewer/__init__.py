"""Looking at scenes and picking parts (issue 19). `select`: the selection a click or a box makes."""
