import HSMAdmin

HSMAdminCommand.main()
