// Built by the client helper; see Package.swift.
