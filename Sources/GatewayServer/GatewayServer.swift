// Built by the server helper; see Package.swift.
