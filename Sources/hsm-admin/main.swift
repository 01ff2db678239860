import HSMAdmin

await HSMAdminCommand.runCommandLine()
