print("quiesce")
